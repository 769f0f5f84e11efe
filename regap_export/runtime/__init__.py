"""ONNX Runtime inference for exported graphs (CPU, or CUDA with IO binding)."""
from .generate import GenerationResult, generate, position_ids_from_mask, probe_score, sequence_alpha
from .session import DecoderOutput, OrtSessions, merge_image_features

__all__ = ["OrtSessions", "DecoderOutput", "GenerationResult", "generate", "merge_image_features",
           "position_ids_from_mask", "probe_score", "sequence_alpha"]
