"""The TAPO algorithm as small pure functions over tensors and plain data. No trainer, no TRL.

Modules: `verify` (answer checking), `selection` (DCS), `trajectory` (prefix + reflection + correction),
`synthesis` (prompt, parsing, assembly, rule-based writer), `splice` (deterministic construction), `tokens`
(span -> token labels), `advantages` (GRPO and DAE), `weights` (OTS: OOD token suppression), `losses` (clipped PG,
TAPO total). The verifier's worker processes live outside, in `tapo.verifier_pool`.
"""
