"""What the tests share: helper modules (``from tests.helpers.daemon import DaemonProcess``)
and the helper scripts the tests launch as subprocesses by path (``pva_script.py``,
``pvapy_read.py``, ``bluesky_peer.py``, ``tiled_server.py``). A script runs with this
folder first on ``sys.path``: no module here may be named after a package a script imports
(``bluesky``, ``tiled``, ``p4p``, ...)."""
