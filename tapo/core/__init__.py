"""The TAPO algorithm as small pure functions over tensors and plain data. No trainer, no TRL.

Modules: `verify` (answer checking), `selection` (DCS), `trajectory` (prefix + reflection +
correction), `synthesis` (prompt, parsing, assembly), `splice` (deterministic construction),
`tokens` (span -> token labels), `advantages` (GRPO and DAE), `weights` (OTS), `losses` (clipped PG, TAPO total).
"""
