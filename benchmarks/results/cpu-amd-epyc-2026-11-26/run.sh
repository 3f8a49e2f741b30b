source /work/main/.venv/bin/activate
cd /work/main
export OMP_NUM_THREADS=2
for v in fp32 cl bf16 bf16cl; do
  case $v in fp32) f="";; bf16) f="--bf16";; cl) f="--channels-last";; bf16cl) f="--bf16 --channels-last";; esac
  python -W ignore benchmarks/bench_train.py --device cpu --dataset mnist --data-dir ../shared/data/mnist --model smallcnn \
    --batch-size 32 --iters 8 --warmup 1 --repeats 7 --steps 10 --threads 2 $f \
    --note "idle 2-core machine (nothing else running); variant $v" --output benchmarks/results/cpu-amd-epyc-2026-11-26/smallcnn-$v.json
done
for v in fp32 cl; do
  case $v in fp32) f="";; cl) f="--channels-last";; esac
  at-mem train --method pgd-at --dataset mnist --data-dir ../shared/data/mnist --model smallcnn --epochs 3 \
    --train-size 2000 --test-size 500 --batch-size 32 --eps 0.1 --step-size 0.02 --steps 10 --eval-steps 10 \
    --lr 0.05 --device cpu --quiet $f --out benchmarks/results/cpu-amd-epyc-2026-11-26/acc-$v
done
echo ALLDONE
