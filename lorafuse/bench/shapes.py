"""Problem shapes for the benchmark: named presets of LLM projections and explicit `M,K,N` triples."""

from typing import NamedTuple


class Shape(NamedTuple):
    """One layer call: x (M, K) @ W^T (K -> N), M being the tokens in the batch."""

    M: int
    K: int
    N: int

    def __str__(self) -> str:
        return f"{self.M}x{self.K}->{self.N}"


#: (in_features, out_features) of each distinct projection. Llama-2 7B: q/k/v/o are 4096 -> 4096 and the
#: MLP is 4096 -> 11008 (gate, up) and 11008 -> 4096 (down). Llama-3 8B uses grouped-query attention,
#: so k/v are 4096 -> 1024, and a 14336-wide MLP. `small` keeps Llama's 1 : 2.6875 MLP ratio at a size
#: a laptop CPU runs in seconds.
PRESETS = {
    "llama-7b": ((4096, 4096), (4096, 11008), (11008, 4096)),
    "llama-3-8b": ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)),
    "small": ((512, 512), (512, 1376), (1376, 512)),
}


def parse_shapes(specs, *, tokens: int) -> list:
    """Shapes for `specs`, each a preset name (M = `tokens`) or an explicit "M,K,N" triple.

    Duplicates are dropped, first occurrence kept, so `--shapes llama-7b 4096,4096,4096` runs once.
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise ValueError(f"tokens must be a positive int, got {tokens!r}")
    if isinstance(specs, str) or not specs:
        raise ValueError(f"shapes must be a non-empty list of presets or M,K,N triples, got {specs!r}")
    shapes = []
    for spec in specs:
        for shape in _parse_one(spec, tokens=tokens):
            if shape not in shapes:
                shapes.append(shape)
    return shapes


def _parse_one(spec, *, tokens):
    if not isinstance(spec, str):
        raise TypeError(f"each shape must be a str (a preset or M,K,N), got {type(spec).__name__}")
    if spec in PRESETS:
        return [Shape(tokens, k, n) for k, n in PRESETS[spec]]
    parts = spec.split(",")
    if len(parts) != 3:
        raise ValueError(f"shape {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an M,K,N triple")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise ValueError(f"shape {spec!r}: M, K and N must be integers") from None
    if min(values) <= 0:
        raise ValueError(f"shape {spec!r}: M, K and N must be positive")
    return [Shape(*values)]
