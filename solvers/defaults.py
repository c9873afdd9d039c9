"""Every default of a solve, in one place: ``odeint``, the controllers and the models use these.

- ``METHOD``, ``RTOL``, ``ATOL``: torchdiffeq's (``dopri5``, 1e-7, 1e-9), so that a call written
  for ``torchdiffeq.odeint`` means the same here.
- ``MAX_STEPS``: fixed-step solves refuse a plan of more steps than this before any work (a step
  size of 1e-300 would otherwise run for ever); adaptive solves stop after this many accepted
  steps.
- ``MAX_NFE``: adaptive solves stop with ``StepSizeError`` after this many field evaluations.
- ``DT_MIN``: the step floor of adaptive solves.
"""

METHOD = "dopri5"
RTOL = 1e-7
ATOL = 1e-9
MAX_STEPS = 100_000
MAX_NFE = 100_000
DT_MIN = 1e-12
