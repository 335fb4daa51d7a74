"""`distspec train-drafter`: distil the demo drafter."""

from __future__ import annotations

import argparse


def add_train_drafter(sub) -> None:
    from distspec.train.pipeline import DrafterRecipe
    from distspec.train.trainer import TrainConfig

    r, t = DrafterRecipe(), TrainConfig()
    p = sub.add_parser("train-drafter", help="distil a drafter from the target's own outputs")
    p.add_argument("--out", default=r.out_dir, help="run directory (resumes if present)")
    p.add_argument(
        "--target", default=r.target, help="the model to distil (demo | PATH; default %(default)s)"
    )
    p.add_argument("--num-prompts", type=int, default=r.num_prompts, help="template prompts")
    p.add_argument(
        "--self-instruct-prompts",
        type=int,
        default=r.self_instruct_prompts,
        help="user requests the target writes itself",
    )
    p.add_argument(
        "--derived-prompts",
        type=int,
        default=r.derived_prompts,
        help="requests about paragraphs and code of earlier answers",
    )
    p.add_argument(
        "--heldout-prompts", type=int, default=r.heldout_prompts, help="per prompt family"
    )
    p.add_argument(
        "--temperatures",
        default=",".join(str(x) for x in r.temperatures),
        help="cycled over the prompts",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=r.max_new_tokens,
        help="longest target answer, in the data and in the evaluation (default %(default)s)",
    )
    p.add_argument("--gen-batch", type=int, default=r.gen_batch, help="sequences generated at once")
    p.add_argument(
        "--layers",
        default=",".join(str(x) for x in r.layers),
        help="target layers the drafter starts from",
    )
    p.add_argument(
        "--draft-vocab", type=int, default=r.draft_vocab, help="head size; 0 = full vocab"
    )
    p.add_argument(
        "--steps", type=int, default=t.steps, help="training steps (default %(default)s)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=t.batch_size,
        help="answers per training step (default %(default)s)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=t.lr,
        help="peak AdamW learning rate, after a linear warm-up, cosine decay to a tenth "
        "(default %(default)s)",
    )
    p.add_argument("--gamma", type=int, default=r.gamma, help="draft length for the evaluation")
    p.add_argument(
        "--seed",
        type=int,
        default=r.seed,
        help="seed of prompt choice, generation and training (default %(default)s)",
    )
    p.set_defaults(func=_train_drafter)


def _train_drafter(args: argparse.Namespace) -> int:
    from distspec.train.pipeline import DrafterRecipe, run
    from distspec.train.trainer import TrainConfig

    recipe = DrafterRecipe(
        target=args.target,
        out_dir=args.out,
        num_prompts=args.num_prompts,
        self_instruct_prompts=args.self_instruct_prompts,
        derived_prompts=args.derived_prompts,
        heldout_prompts=args.heldout_prompts,
        temperatures=[float(t) for t in args.temperatures.split(",")],
        max_new_tokens=args.max_new_tokens,
        gen_batch=args.gen_batch,
        layers=[int(x) for x in args.layers.split(",")],
        draft_vocab=args.draft_vocab,
        gamma=args.gamma,
        seed=args.seed,
        train=TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed),
    )
    record = run(recipe)
    print(
        f"held-out: tau {record['tokens_per_target_forward']:.2f}, "
        f"acceptance {record['acceptance_rate']:.2f}; drafter in {args.out}/drafter"
    )
    return 0
