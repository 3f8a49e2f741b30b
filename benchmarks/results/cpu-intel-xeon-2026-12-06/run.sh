# Issue 21, the CPU measurements (2026-12-06), exactly as run, in this order. The machine: Intel Xeon,
# 2 cores, shared with other sessions that ran test suites at times (each JSON records the load
# average); every measurement alternates its sides or repeats its configurations, and one thread
# per process keeps a competing process on the other core from stalling it. No GPU was lent.
source /work/main/.venv/bin/activate
cd /work/main
D=benchmarks/results/cpu-intel-xeon-2026-12-06
# item 1: the attack with and without its weight gradients, eager and --compile (inductor), one run each
python -W ignore benchmarks/attack_grads.py --device cpu --dataset mnist --data-dir ../shared/data/mnist --model smallcnn \
  --batch-size 32 --steps 10 --iters 4 --warmup 1 --repeats 5 --threads 1 \
  --note "2-core Intel Xeon shared with other sessions (their test suites ran at times); one thread; sides alternated" \
  --output $D/attack-grads-smallcnn.json
python -W ignore benchmarks/attack_grads.py --device cpu --dataset cifar10 --random-data --model preactresnet18 \
  --batch-size 16 --steps 10 --iters 2 --warmup 1 --repeats 3 --threads 1 \
  --note "2-core Intel Xeon shared with other sessions (their test suites ran at times); one thread; sides alternated; random uint8 CIFAR-shaped images (timing only)" \
  --output $D/attack-grads-preactresnet18.json
# item 4: two one-thread runs against one two-thread run (and one two-thread run of batch 64)
python -W ignore benchmarks/concurrency.py --device cpu --dataset mnist --data-dir ../shared/data/mnist --model smallcnn \
  --steps 10 --iters 8 --warmup 1 --repeats 3 --rounds 2 --configs 1x32t1 1x32t2 2x32t1 1x64t2 --variants eager \
  --note "2-core Intel Xeon shared with other sessions (load average recorded per configuration); two rounds, the summary takes each configuration's best" \
  --output $D/concurrency-smallcnn.json
# item 5 (and item 2's whole epoch): where an epoch's time goes, the MNIST study's settings
python -W ignore benchmarks/bench_train.py --device cpu --dataset mnist --data-dir ../shared/data/mnist --model smallcnn \
  --batch-size 32 --steps 3 --eps 0.1 --step-size 0.04 --threads 1 --full-epoch --skip-compare \
  --methods pgd-at pgd-at-te trades trades-te --epochs 3 --train-size 500 --test-size 500 --eval-train-size 250 --eval-steps 10 \
  --note "the MNIST study's per-run settings (docs/REPRODUCTION.md section 1: 500 training images, PGD-3 eps 0.1 step 0.04, batch 32, per-epoch PGD-10 on 500 test and 250 training points), but smallcnn with its default dropout and no label noise (neither changes the arithmetic); one thread, as the study's runs had one core each; 2-core Intel Xeon shared with other sessions" \
  --output $D/full-epoch-mnist-study.json
# item 2: the CPU benchmark's setting, training steps (alternated with the reference) and whole epochs in one run
python -W ignore benchmarks/bench_train.py --device cpu --dataset mnist --data-dir ../shared/data/mnist --model smallcnn \
  --batch-size 32 --steps 10 --iters 8 --warmup 1 --repeats 5 --threads 1 --methods pgd-at trades \
  --full-epoch --epochs 2 --train-size 2000 --test-size 500 --eval-steps 10 \
  --note "the CPU benchmark's setting (smallcnn, batch 32, PGD-10 eps 8/255 step 2/255): training steps (package vs reference, alternated) and whole epochs (2,000 = 62 x 32 + 16 images, per-epoch PGD-10 on 500 test points) in one run; one thread; 2-core Intel Xeon shared with other sessions" \
  --output $D/smallcnn-fp32-full-epoch.json
# item 5: the evaluation with its set-up made once against the former code, and other batch sizes
python -W ignore benchmarks/eval_setup.py --device cpu --dataset mnist --data-dir ../shared/data/mnist --model smallcnn \
  --batch-size 32 --steps 3 --eps 0.1 --step-size 0.04 --train-size 500 --test-size 500 --eval-train-size 250 \
  --eval-steps 10 --threads 1 --repeats 5 --batch-sizes 64 128 512 \
  --note "the MNIST study's evaluation (500 test + 250 training points, PGD-10 eps 0.1 step 0.04) on a model trained 1 epoch; one thread; sides alternated; 2-core Intel Xeon shared with other sessions" \
  --output $D/eval-setup-mnist-study.json
