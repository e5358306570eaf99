"""Export fine-tuned Keras models as versioned SavedModels for TF Serving.

`export_for_serving(model, "exports/digits")` writes `exports/digits/<N>/`;
`verify_export(dir)` (or `python -m tftransfer.export verify DIR`) loads an
export and checks its signatures and files. The names and files of the
serving contract live in `tftransfer.export._contract`; docs/serving.md has
the tables and the serving recipes.
"""

from tftransfer.export._contract import existing_versions
from tftransfer.export._writer import export_for_serving
from tftransfer.export.verify import VerifyError, resolve_version_dir, verify_export

__all__ = ["VerifyError", "existing_versions", "export_for_serving", "resolve_version_dir",
           "verify_export"]
