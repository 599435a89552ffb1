import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# XLA's CPU backend spends most of a small test's time in LLVM's optimisation passes;
# the suite compiles thousands of small programs and runs each a few times, so it
# compiles them unoptimised (the HLO passes, fusion included, still run). On the
# 2-core machine this took the JAX session from 1644 s to 852 s and TensorFlow's from
# 901 s to 493 s. Benchmarks do not import this file and keep XLA's defaults.
# Subprocesses the tests start inherit them (the distribution tests add a device count).
FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_XLA_FLAGS}".strip()

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {keras.backend.backend()}"
