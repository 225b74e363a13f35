"""TRL's GRPOTrainer on the problems benchmarks/compare_trl.py wrote: the other half of the comparison.

Runs in TRL's own environment (torch, transformers, trl; never grpo_jax's), so it imports nothing
from grpo_jax but its math grader, by file path: the reward is the same code on both sides.

    $VENV/bin/python benchmarks/trl_grpo.py --task=runs/compare_trl/task.json --seed=0 --out=runs/compare_trl/trl/seed0

The task file holds the starting model (an HF folder), the training and held-out problems (chat
messages, gold answer, and grpo_jax's prompt token ids, checked against TRL's), and every setting.
Writes OUT/metrics.jsonl: one line per GRPO step (reward, format reward, length) and one per
evaluation (held-out greedy pass@1 and accuracy of `eval_k` samples at temperature 1), as grpo_jax
logs them.
"""

import argparse
import importlib.util
import json
import os
import time

import torch
import transformers
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("math_grader", os.path.join(_HERE, "..", "grpo_jax", "rewards", "math_grader.py"))
math_grader = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(math_grader)


def math(completions, answer, **kw):
    return [math_grader.math_reward(_text(c), a) for c, a in zip(completions, answer)]


def answer_format(completions, **kw):
    return [math_grader.format_reward(_text(c)) for c in completions]


def _text(completion) -> str:  # conversational prompts give [{"role": "assistant", "content": ...}]
    return completion[0]["content"] if isinstance(completion, list) else completion


@torch.no_grad()
def evaluate(model, tok, rows, s, seed) -> dict:
    """Greedy pass@1 and mean accuracy of `eval_k` samples at temperature 1, in batches of 64."""
    model.eval()
    prompts = [r["prompt_ids"] for r in rows]
    eos = s["eos_ids"]

    def generate(ids, **kw):
        width = max(map(len, ids))
        x = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in ids])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
        out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=s["max_new_tokens"], eos_token_id=eos,
                             pad_token_id=tok.pad_token_id, **kw)
        return tok.batch_decode(out[:, width:], skip_special_tokens=True)

    def scores(texts, golds):
        return [math_grader.math_reward(t, g) for t, g in zip(texts, golds)]

    golds = [r["answer"] for r in rows]
    greedy, sampled = [], []
    rng = torch.get_rng_state()  # evaluation draws must not move training's stream
    torch.manual_seed(seed)
    for i in range(0, len(rows), 64):
        greedy += scores(generate(prompts[i:i + 64], do_sample=False), golds[i:i + 64])
        for _ in range(s["eval_k"]):
            sampled += scores(generate(prompts[i:i + 64], do_sample=True, temperature=1.0, top_k=0, top_p=1.0),
                              golds[i:i + 64])
    torch.set_rng_state(rng)
    model.train()
    return {"eval/pass@1": sum(greedy) / len(greedy), f"eval/mean@{s['eval_k']}_sampled": sum(sampled) / len(sampled)}


class Log(transformers.TrainerCallback):
    """One JSON line per step (TRL's logs) and per evaluation, flushed as it comes."""

    def __init__(self, path, trainer_ref, rows, s, seed):
        self.fh = open(path, "w")
        self.trainer_ref, self.rows, self.s, self.seed = trainer_ref, rows, s, seed
        self.t0 = time.perf_counter()

    def write(self, rec):
        self.fh.write(json.dumps(rec) + "\n")
        self.fh.flush()

    def eval(self, step, model):
        rec = evaluate(model, self.trainer_ref[0].processing_class, self.rows, self.s, self.seed + step)
        self.write({"step": step, **rec, "wall_s": time.perf_counter() - self.t0})
        print(f"step {step} | " + " ".join(f"{k}={v:.3f}" for k, v in rec.items()), flush=True)

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.eval(0, model)

    def on_log(self, args, state, control, logs=None, **kw):
        keep = ("reward", "rewards/math/mean", "rewards/answer_format/mean", "completions/mean_length",
                "frac_reward_zero_std", "learning_rate", "loss", "grad_norm", "entropy")
        if logs and "reward" in logs:
            self.write({"step": state.global_step, **{k: logs[k] for k in keep if k in logs},
                        "wall_s": time.perf_counter() - self.t0})

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step % self.s["eval_every"] == 0 or state.global_step == state.max_steps:
            self.eval(state.global_step, model)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    task = json.load(open(a.task))
    s = task["settings"]
    if a.threads:
        torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    tok = transformers.AutoTokenizer.from_pretrained(task["model"])
    # The prompts TRL will feed the model must be grpo_jax's, token for token.
    for r in task["train"][:64] + task["eval"]:
        ids = tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)
        if list(ids["input_ids"]) != r["prompt_ids"]:
            raise SystemExit(f"TRL's tokens for {r['prompt']} differ from grpo_jax's: {ids['input_ids']} vs "
                             f"{r['prompt_ids']}")
    train = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in task["train"]])
    o = s["optimizer"]
    args = GRPOConfig(
        output_dir=a.out, seed=a.seed, data_seed=a.seed, max_steps=s["steps"], report_to=[], save_strategy="no",
        logging_steps=1, model_init_kwargs={"dtype": torch.float32}, use_cpu=True,
        per_device_train_batch_size=s["prompts_per_step"] * s["num_generations"], gradient_accumulation_steps=1,
        num_generations=s["num_generations"], num_iterations=1, max_completion_length=s["max_new_tokens"],
        temperature=1.0, top_p=1.0, top_k=0, beta=s["beta"], epsilon=s["clip_eps"], loss_type=s["loss_type"],
        scale_rewards="group", reward_weights=s["reward_weights"],
        learning_rate=o["learning_rate"], warmup_steps=o["warmup_steps"], lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": o["final_lr_fraction"]}, adam_beta1=o["b1"], adam_beta2=o["b2"],
        weight_decay=o["weight_decay"], max_grad_norm=o["max_grad_norm"])
    ref = []
    log = Log(os.path.join(a.out, "metrics.jsonl"), ref, task["eval"], s, a.seed)
    trainer = GRPOTrainer(model=task["model"], reward_funcs=[math, answer_format], args=args, train_dataset=train,
                          processing_class=tok, callbacks=[log])
    ref.append(trainer)
    trainer.train()
    print(f"trl {s['steps']} steps in {time.perf_counter() - log.t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
