"""Evaluation settings that cannot run; bad data raises tapo.data.DataError instead."""


class EvalConfigError(ValueError):
    """Settings that cannot run here (e.g. vllm without CUDA) or that contradict the run folder being resumed."""
