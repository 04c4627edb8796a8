"""How much each transformer block changes the hidden state: the measure structured pruning drops blocks by.

For block *l* with input *x* and output *y* at a token, the angular distance is ``arccos(cos(x, y)) / π`` (0: the
block leaves the direction of the residual stream unchanged; Gromov et al. 2024 and ShortGPT's Block Influence,
``1 − cos``, rank blocks the same way). It is averaged over the calibration tokens, leaving out the first, whose
hidden state in these models is an outlier of huge norm that every block leaves alone. Blocks are hooked one by
one, so the last block's output is taken before the model's final norm (the hidden states transformers returns
end after it).

Runs in a child process (:mod:`slmops.ops.children`): transformers loads the GGUF's weights dequantized to float32.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from slmops.ops import hf_gguf
from slmops.ops.children import report


def block_distances(gguf: Path, text: str, max_tokens: int) -> tuple[list[float], int]:
    """Per block, the mean angular distance between its input and output over ``text``'s first tokens."""
    import torch

    tok = hf_gguf.tokenizer(gguf)
    model = hf_gguf.model(gguf).eval()
    ids = tok(text, return_tensors="pt").input_ids[:, :max_tokens]
    blocks = model.model.layers
    sums = [0.0] * len(blocks)
    seen: dict[int, torch.Tensor] = {}

    def before(i: int):  # type: ignore[no-untyped-def]
        def hook(_module, args, kwargs):  # type: ignore[no-untyped-def]
            seen[i] = (args[0] if args else kwargs["hidden_states"])[0, 1:].detach()
        return hook

    def after(i: int):  # type: ignore[no-untyped-def]
        def hook(_module, _args, _kwargs, output):  # type: ignore[no-untyped-def]
            y = (output[0] if isinstance(output, tuple) else output)[0, 1:]
            cos = torch.nn.functional.cosine_similarity(seen.pop(i).double(), y.double(), dim=-1)
            sums[i] = float((torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi).mean())
            report(step="block", done=i + 1, total=len(blocks))
        return hook

    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(before(i), with_kwargs=True)
        block.register_forward_hook(after(i), with_kwargs=True)
    with torch.no_grad():
        model(ids)
    return sums, int(ids.shape[1])


def main(argv: list[str]) -> None:
    """``GGUF TEXT_FILE MAX_TOKENS``: prints the distances as the last JSON line."""
    gguf, text, max_tokens = Path(argv[0]), Path(argv[1]).read_text(), int(argv[2])
    distances, tokens = block_distances(gguf, text, max_tokens)
    report(distances=distances, tokens=tokens)


if __name__ == "__main__":
    main(sys.argv[1:])
