"""What Hugging Face transformers makes of a GGUF file: token ids, chat prompts, logits, greedy tokens.

Run as a subprocess (torch and paddle never share a process in this suite):

    python hf_gguf_reference.py SPEC.json OUT_DIR

SPEC.json: {"gguf": path, "texts": [str], "chats": [[{"role", "content"}]],
"logit_prompts": [[id]], "generate_prompts": [str], "generate_chats": [[message]],
"max_new_tokens": int}.
OUT_DIR gets result.json ({"ids", "chat_prompts", "generated", "chat_texts"}) and
logits_<i>.npy (float32 [len, vocab]) for each logit prompt. No pickles.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    gguf = Path(spec["gguf"])
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    result: dict[str, object] = {"ids": [tok(t)["input_ids"] for t in spec.get("texts", [])]}
    result["chat_prompts"] = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                              for c in spec.get("chats", [])]
    if spec.get("logit_prompts") or spec.get("generate_prompts") or spec.get("generate_chats"):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
        with torch.no_grad():
            for i, ids in enumerate(spec.get("logit_prompts", [])):
                logits = model(torch.tensor([ids])).logits[0].float().numpy()
                np.save(out / f"logits_{i}.npy", logits, allow_pickle=False)
            generated = []
            for text in spec.get("generate_prompts", []):
                ids = tok(text, return_tensors="pt")
                seq = model.generate(**ids, max_new_tokens=spec["max_new_tokens"], do_sample=False,
                                     pad_token_id=tok.eos_token_id)
                generated.append(seq[0, ids["input_ids"].shape[1]:].tolist())
            result["generated"] = generated
            chat_texts = []
            for chat in spec.get("generate_chats", []):
                ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
                seq = model.generate(**ids, max_new_tokens=spec["max_new_tokens"], do_sample=False,
                                     pad_token_id=tok.eos_token_id)
                chat_texts.append(tok.decode(seq[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
            result["chat_texts"] = chat_texts
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
