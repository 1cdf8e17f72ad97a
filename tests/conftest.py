import os

import torch
from hypothesis import HealthCheck, settings

# "ci" runs the property tests with their full example counts and no deadline (shared machines
# are noisy); "dev" is quicker for local iteration: HYPOTHESIS_PROFILE=dev pytest.
settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
settings.register_profile("dev", deadline=None, max_examples=30)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The tests' tensors are tiny: one thread is as fast, and beside any other busy process two
# OpenMP threads spin-wait for each other at every operator (measured: a power-iteration test took
# 39 s with 2 threads and 10 s with 1 on a 2-core machine running another job at low priority).
torch.set_num_threads(1)
