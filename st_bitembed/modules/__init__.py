from __future__ import annotations

from st_bitembed.modules.subln_transformer import SubLNTransformer

__all__ = ["SubLNTransformer"]
