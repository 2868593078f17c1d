"""Host side: the server zipapp shipped into every sandbox."""

from sandboxnb.server import bundle_bytes, bundle_path

__all__ = ["bundle_bytes", "bundle_path"]
