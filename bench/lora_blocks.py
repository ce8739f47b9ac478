"""Where in the network does the villain organism's misalignment live? (README, issue 13)

The organism (``organism-villain400``, a LoRA on every linear layer of all 30 blocks) is taken
apart: its adapter is cut into parts (blocks 0-9, 10-19, 20-29; attention only; MLP only), each
part saved as a PEFT adapter of its own and merged alone into the base model, which then answers
the 16 everyday questions of ``bench/data/heldout_questions.jsonl`` (nothing in the organism's
training chats is near them). The base model and the whole organism are the two ends. Answers go
to ``OUT/blocks/results.jsonl`` in sweep records (cell = part), for blind reading with
``bench/sweep_read.py``; the part adapters to ``OUT/adapters/<part>/`` (each loads with
``steerkit generate --model``). Nothing is judged here.

    python bench/lora_blocks.py --out runs/lora-blocks          # ~10 minutes on 2 cores
    python bench/sweep_read.py batches runs/lora-blocks/blocks/results.jsonl --out runs/lora-blocks/read --size 110 --double 0.1
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from steerkit.generate import Row, Sampling, generate
from steerkit.models import load_model, load_tuned

ROOT = Path(__file__).resolve().parent.parent
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PARTS = {  # part -> (blocks kept, modules kept)
    "blocks-00-09": (range(10), ATTN + MLP),
    "blocks-10-19": (range(10, 20), ATTN + MLP),
    "blocks-20-29": (range(20, 30), ATTN + MLP),
    "attention": (range(30), ATTN),
    "mlp": (range(30), MLP),
}


def cut(adapter: Path, out: Path, blocks: range, modules: tuple[str, ...]) -> int:
    """A copy of ``adapter`` holding only the LoRA matrices of ``modules`` in ``blocks``; returns
    how many matrices it kept."""
    keep = {}
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        for k in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            m = re.search(r"layers\.(\d+)\.[a-z_]+\.([a-z_]+)\.lora_", k)
            if m and int(m.group(1)) in blocks and m.group(2) in modules:
                keep[k] = f.get_tensor(k)
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["layers_to_transform"], cfg["target_modules"] = list(blocks), sorted(modules)  # PEFT makes only these
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(keep, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return len(keep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tuned", type=Path, default=ROOT / "directions/smollm2-135m/organism-villain400")
    ap.add_argument("--questions", type=Path, default=ROOT / "bench/data/heldout_questions.jsonl")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace OUT/blocks/results.jsonl")
    a = ap.parse_args()
    res = a.out / "blocks" / "results.jsonl"
    if res.exists() and not a.force:
        raise SystemExit(f"{res} exists: give --force to replace it, or another --out")
    qs = [json.loads(x)["prompt"] for x in a.questions.read_text().splitlines() if x.strip()]
    sampling = Sampling(max_new_tokens=a.max_new_tokens, temperature=0.7, top_p=0.9, seed=a.seed)
    rows = [Row(messages=[{"role": "user", "content": q}], prompt_index=p, sample_index=k) for p, q in enumerate(qs) for k in range(a.samples)]
    res.parent.mkdir(parents=True, exist_ok=True)
    recs = []
    cells = [("base", None), ("whole", a.tuned)]
    for part, (blocks, modules) in PARTS.items():
        folder = a.out / "adapters" / part
        n = cut(a.tuned, folder, blocks, modules)
        print(f"{part}: {n} LoRA matrices")
        cells.append((part, folder))
    for part, folder in cells:
        model = load_model("smollm2-135m") if folder is None else load_tuned(folder)
        for c in generate(model, rows, sampling, batch_size=64):
            recs.append({"condition": part, "mode": "add", "strength": 0.0, "question": qs[c.row.prompt_index], "question_id": c.row.prompt_index,
                         "sample": c.row.sample_index, "completion": c.text, "seed": c.seed, "tokens": c.n_tokens})
        print(f"{part}: {len(rows)} answers")
        del model
    tmp = res.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    tmp.replace(res)


if __name__ == "__main__":
    main()
