"""``shortline bench``: policies against the live stack and the simulator, same requests.

    runner.py       ``shortline bench``: puts the pieces below in order
    config.py       BenchConfig (flags, SHORTLINE_BENCH_*), the live cache size
    workload.py     the replayed requests: alpaca_eval lengths at Azure trace arrivals
    live.py         one live cell over gRPC: replay, step probe, guard counters
    live_sweep.py   the stack the benchmark starts, every policy and load run on it
    summary.py      what a cell reports: its summary row, goodput, the paper's metric
    calibration.py  the simulator fitted to the live cells, each cell simulated again
    simulated.py    what two cores cannot run live: at scale, sensitivity, aging sweep
    spread.py       the live cells replayed jittered: how far one run can move
    report/         results.json, results.md (tables, markdown) and the PNG plots

Statistics shared with the simulator and the predictor (percentiles, Kendall's
tau, completion summaries, ratios to fcfs) are in :mod:`shortline.common.stats`.
"""
