"""Time one S3 training step (batch of 32) on synthetic inputs, with the process's CPU time beside wall time.

On a shared machine the wall time of a step depends on the other jobs; user + system CPU time less so. With T
torch threads on an idle machine, wall time per step is at best (user CPU) / T. Decoding is not included (in
`embed finetune` it runs in DataLoader workers, in parallel with the step).
Usage: python benchmarks/s3_step_cpu.py image|text [--steps 3] [--batch-size 32] [--image-size 224]
"""
import argparse
import resource
import time

import torch

from embedstore.modules import build_module

parser = argparse.ArgumentParser()
parser.add_argument("modality", choices=["image", "text"])
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--image-size", type=int, default=224)
args = parser.parse_args()

torch.manual_seed(0)
name = "efficientnet_lite0" if args.modality == "image" else "all-MiniLM-L6-v2"
module = build_module(args.modality, 3, 37, name=name, image_size=args.image_size).train()
if args.modality == "image":
    inputs = torch.randn(args.batch_size, 3, args.image_size, args.image_size)  # (B, 3, H, W)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)
else:
    inputs = module.backbone.tokenize(["Puma Men Black Running Shoes with a Printed Logo"] * args.batch_size)
    optimizer = torch.optim.AdamW(module.parameters(), lr=5e-5)
labels = torch.randint(0, 37, (args.batch_size,))
print(f"{args.modality} {name}, batch {args.batch_size}, {torch.get_num_threads()} threads")
for step in range(args.steps + 1):  # step 0 warms up (allocates the optimizer state)
    before, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    loss = torch.nn.functional.cross_entropy(module(inputs), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    wall, after = time.perf_counter() - wall, resource.getrusage(resource.RUSAGE_SELF)
    print(f"step {step}{' (warm-up)' if step == 0 else ''}: wall {wall:.2f} s, user CPU "
          f"{after.ru_utime - before.ru_utime:.2f} s, system CPU {after.ru_stime - before.ru_stime:.2f} s, "
          f"minor page faults {after.ru_minflt - before.ru_minflt:,}")
