import os

from hypothesis import HealthCheck, settings

# "ci" runs the property tests with their full example counts and no deadline (shared machines
# are noisy); "dev" is quicker for local iteration: HYPOTHESIS_PROFILE=dev pytest.
settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
settings.register_profile("dev", deadline=None, max_examples=30)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
