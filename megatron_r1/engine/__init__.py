"""The engine: what builds a parallel model and runs its steps, above `model/` and `ckpt/`.

Imports run one way: `parallel/` (primitives: mesh, collectives, layers, schedules, ZeRO) <- `model/`,
`ckpt/` <- `engine/` (runtime.py: chunks, train/forward steps, full states; check.py: the layout
check; strict.py: the device guard of `check-parallel --strict-device`) <- trainers.
"""
