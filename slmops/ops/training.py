"""Training steps on the CPU, run in a child process (:mod:`slmops.ops.children`): PyTorch and transformers, which
load a GGUF's weights dequantized to float32.

Distillation heals a pruned or quantized student against its teacher (the model it was made from): the loss is
the KL divergence from the teacher's next-token distribution to the student's, at every position of windows of
a text (Hinton et al.'s soft targets, temperature-scaled). Matching whole distributions carries far more signal
per token than the text's own next tokens, which is why a few dozen steps on a few thousand tokens recover much
of what the cut lost. Every step reports its loss as a JSON line; the parent draws the progress bar and the curve.

Fine-tuning on rated feedback trains a LoRA adapter (``peft``) instead of the weights: a few megabytes that
llama.cpp applies on top of the released model (a Modelfile's ``ADAPTER``), so a release that is only a new adapter
ships only that. The loss is the cross-entropy of the rated answers (and the end of turn after them) given their
conversation, rendered with the model's own chat template as serving renders it; prompts are context, not targets.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from slmops.ops import hf_gguf
from slmops.ops.children import report


def windows(ids: list[int], length: int) -> list[list[int]]:
    """Overlapping windows (half a window apart) covering ``ids``: every token is seen with context."""
    if len(ids) <= length:
        return [ids]
    step = max(1, length // 2)
    return [ids[i:i + length] for i in range(0, len(ids) - length + 1, step)]


def distill(teacher_gguf: Path, student_gguf: Path, text: str, out: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """Train the student on ``text`` against the teacher; save it as a Hugging Face folder at ``out``."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(plan.get("seed", 0))
    if plan.get("threads"):
        torch.set_num_threads(int(plan["threads"]))
    tok = hf_gguf.tokenizer(teacher_gguf)
    teacher, student = hf_gguf.model(teacher_gguf).eval(), hf_gguf.model(student_gguf).train()
    if teacher.config.vocab_size != student.config.vocab_size:
        raise SystemExit("the student's vocabulary differs from the teacher's; distil models of one family")
    chunks = windows(tok(text).input_ids, int(plan["seq_len"]))
    opt = torch.optim.AdamW(student.parameters(), lr=float(plan["lr"]), weight_decay=0.0)
    steps, batch, temp = int(plan["steps"]), int(plan["batch"]), float(plan.get("temperature", 1.0))
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    losses, t0 = [], time.monotonic()
    for step in range(steps):
        picked = [chunks[(step * batch + j) % len(chunks)] for j in range(batch)]
        width = min(len(c) for c in picked)
        ids = torch.tensor([c[:width] for c in picked])
        with torch.no_grad():
            target = F.log_softmax(teacher(ids).logits / temp, dim=-1)
        pred = F.log_softmax(student(ids).logits / temp, dim=-1)
        loss = F.kl_div(pred.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean") * temp**2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
        report(step="train", done=step + 1, total=steps, loss=losses[-1])
    from slmops.ops.onnx_export import save_hf

    save_hf(student, tok, student_gguf, out)
    return {"losses": losses, "tokens_per_step": batch * width, "windows": len(chunks),
            "seconds": time.monotonic() - t0}


def _examples(tok, template_src: str, conversations: list[list[dict[str, Any]]], max_len: int):  # type: ignore[no-untyped-def]
    """(token ids, labels) per conversation: the answer and end of turn are the labels, the rest is -100."""
    from slmops.modelfile.template import ChatTemplate

    template = ChatTemplate.compile(template_src, tok.bos_token or "", tok.eos_token or "")
    out = []
    for conv in conversations:
        prompt = template.render(conv[:-1])
        head = tok(prompt, add_special_tokens=True).input_ids
        answer = tok(conv[-1]["content"], add_special_tokens=False).input_ids
        if tok.eos_token_id is not None:
            answer.append(tok.eos_token_id)
        ids = (head + answer)[-max_len:]
        labels = ([-100] * len(head) + answer)[-max_len:]
        out.append((ids, labels))
    return out


def lora(base_gguf: Path, examples: dict[str, Any], out: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """Train a LoRA adapter on ``examples`` (template and conversations); save it and the base's config at ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(plan.get("seed", 0))
    if plan.get("threads"):
        torch.set_num_threads(int(plan["threads"]))
    tok = hf_gguf.tokenizer(base_gguf)
    model = hf_gguf.model(base_gguf)
    data = _examples(tok, examples["template"], examples["train"], int(plan["max_len"]))
    config = LoraConfig(r=int(plan["rank"]), lora_alpha=float(plan["alpha"]), lora_dropout=0.0, bias="none",
                        target_modules=list(plan["targets"]), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(plan["lr"]), weight_decay=0.0)
    steps, batch = int(plan["steps"]), int(plan["batch"])
    order = torch.randperm(len(data)).tolist()
    losses, t0, pad = [], time.monotonic(), tok.pad_token_id if tok.pad_token_id is not None else 0
    peft_model.train()
    for step in range(steps):
        picked = [data[order[(step * batch + j) % len(data)]] for j in range(batch)]
        width = max(len(ids) for ids, _ in picked)
        ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in picked])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in picked])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in picked])
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss))
        report(step="train", done=step + 1, total=steps, loss=losses[-1])
    if plan.get("merge"):
        from slmops.ops.onnx_export import save_hf

        save_hf(peft_model.merge_and_unload(), tok, base_gguf, out / "merged")
    else:
        peft_model.save_pretrained(str(out / "adapter"))
        model.config.architectures = [type(model).__name__]  # the converter picks its model class by this
        model.config.save_pretrained(str(out / "base"))
    trainable = sum(p.numel() for p in params)
    return {"losses": losses, "examples": len(data), "trainable_parameters": trainable,
            "seconds": time.monotonic() - t0}


def main(argv: list[str]) -> None:
    """``distill TEACHER STUDENT TEXT_FILE OUT_DIR PLAN_JSON`` or ``lora BASE EXAMPLES_JSON OUT_DIR PLAN_JSON``: the
    result is the last JSON line."""
    step, *args = argv
    if step == "distill":
        teacher, student, text, out, plan = args
        report(**distill(Path(teacher), Path(student), Path(text).read_text(), Path(out), json.loads(plan)))
    elif step == "lora":
        base, examples, out, plan = args
        report(**lora(Path(base), json.loads(Path(examples).read_text()), Path(out), json.loads(plan)))
    else:
        raise SystemExit(f"unknown step {step!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
