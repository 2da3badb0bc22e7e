"""notebooks/kernel_development.ipynb runs from top to bottom (its cells check the science), so it never rots."""

from pathlib import Path

from extras import need_extra

nbformat = need_extra("nbformat")
nbclient = need_extra("nbclient")
jupyter_client = need_extra("jupyter_client")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "kernel_development.ipynb"


def test_kernel_development_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the figures
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Unix-domain sockets between the test and the kernel: no TCP port is opened, not even on loopback.
    km = jupyter_client.KernelManager(kernel_name="python3", transport="ipc")
    km.connection_file = str(tmp_path / "kernel.json")
    km.ip = str(tmp_path / "kernel-ipc")
    client = nbclient.NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    figures = sum(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs)
    assert figures >= 7, f"expected a figure from every kernel section, got {figures}"
