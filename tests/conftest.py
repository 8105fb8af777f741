"""Test-session setup: CPU only, 8 simulated devices, cheap XLA compiles, a shared compilation cache."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is compile-bound: lighter LLVM optimisation roughly halves XLA's CPU compile time.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true").strip()
# Subprocess runs of the trainer (tests/test_train.py) share compiled programs through this cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "swiftbrush-jax-test-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
