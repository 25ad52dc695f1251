"""The runtime must run an ONNX model on a device without torch: import and inference never import it."""

import subprocess
import sys
import textwrap

from edge_ad.data.synthetic import write_category
from edge_ad.train.pipeline import train_bundle

BLOCK = "import sys; sys.modules['torch'] = None  # any 'import torch' now raises ImportError\n"


def test_inference_and_cli_without_torch(tmp_path):
    cat = write_category(tmp_path / "cat", n_train=20, n_test_good=2, n_test_defect=1, size=64, seed=2)
    train_bundle("gaussian", cat, tmp_path / "b", image_size=64)
    code = BLOCK + textwrap.dedent(f"""
        import numpy as np
        import edge_ad, edge_ad.scoring, edge_ad.bundle, edge_ad.inspector
        from edge_ad.bundle import Bundle
        from edge_ad.inspector import Inspector
        from edge_ad.runtime.backends import open_backend
        b = Bundle.open({str(tmp_path / 'b')!r}, verify=True)
        insp = Inspector(b, open_backend(b, "onnxruntime", device="cpu"))
        s = insp.inspect([np.zeros((80, 90, 3), np.uint8)])
        assert s.scores.shape == (1,)
        from edge_ad.cli import main
        try:
            main(["--help"])
        except SystemExit as e:
            assert e.code == 0
        print("ok", "torch" in sys.modules and sys.modules["torch"] is not None)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "ok False"
