"""What a compiled kernel is specialized for, and its name (no TVM import here)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Workload:
    """What a compiled kernel is specialized for (everything else is symbolic)."""

    head_dim: int
    dtype: str  # "float32" | "float16" | "bfloat16"
    causal: bool

    @property
    def name(self) -> str:
        """e.g. ``fwd_bfloat16_d128_causal``: log folders and exported function names."""
        return f"fwd_{self.dtype}_d{self.head_dim}{'_causal' if self.causal else ''}"
