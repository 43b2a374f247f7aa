export VIDEOANCHOR_GIT_SHA=6279aaf6ca6fcb54954a50458a3e328a9215012c
cd /tmp/va_run
python3 benchmarks/bench_ssc.py --device cpu --repeats 3 --fixed60 1024,512 --converge 512,256 --skip-limits --name ssc_ratio --out-dir out > out/ratio_default.log 2>&1
python3 benchmarks/bench_ssc.py --device cpu --threads 1 --repeats 2 --fixed60 1024,512 --converge 1024,512 --skip-limits --name ssc_ratio_1thread --out-dir out > out/ratio_1thread.log 2>&1
