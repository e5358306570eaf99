"""TensorFlow's native start-up lines, held back unless `--verbose`.

Importing TensorFlow prints lines from its C++ runtime to the process's
standard error before `TF_CPP_MIN_LOG_LEVEL` is read (absl's
"All log messages before absl::InitializeLog()", CUDA probing on a machine
without a GPU, `cpu_feature_guard`). They say nothing about the search. The
search drops them in two places: the lines its trial workers write
(`is_startup_noise`, filtered by the pool) and the lines of an import in the
search's own process (`native_startup`, for in-process trials).
"""

import contextlib
import os
import re
import sys
import tempfile

_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|To enable the following instructions:"
    r"|[IWE]\d{4} [\d:.]+\s+\d+ (cudart_stub|cuda_\w+|cpu_feature_guard|port|dso_loader"
    r"|computation_placer|gpu_device|cpu_utils|service|xla_bridge)\.cc:\d+\]"
    r"|.*Unable to register cu(DNN|FFT|BLAS) factory"
    r"|.*TF-TRT Warning)")


def is_startup_noise(line):
    """Whether `line` is one of TensorFlow's native start-up lines."""
    return bool(_NOISE.match(line))


@contextlib.contextmanager
def native_startup(verbose=False):
    """Runs a block (TensorFlow's import) with its start-up lines held back.

    The process's standard error (file descriptor 2, where the C++ runtime
    writes) goes to a temporary file for the block; afterwards every line
    that is not start-up noise is written back, so warnings and errors stay.
    Does nothing with `verbose` or when TensorFlow is already imported.

    Args:
        verbose: Boolean, keep every line.
    """
    if verbose or "tensorflow" in sys.modules:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines(True)
                    if not is_startup_noise(line)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def import_tensorflow(verbose=False):
    """Imports TensorFlow, Keras and KerasTuner quietly and probes the devices.

    Listing the physical devices runs CUDA's probe (its lines come then, not
    at import) without initialising the runtime, so logical devices and
    strategies can still be configured afterwards.
    """
    with native_startup(verbose):
        import keras  # noqa: F401
        import keras_tuner  # noqa: F401
        import tensorflow as tf

        tf.config.list_physical_devices()


if __name__ == "__main__":  # `python -m tftransfer.search._quiet [verbose]`: what stays on stderr
    import_tensorflow(verbose=sys.argv[1:] == ["verbose"])
    print("after import", file=sys.stderr)
