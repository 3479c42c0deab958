"""FVG-PT Serve: few-shot CLIP prompt tuning with the FVG-PT plugin (arXiv 2603.08708)."""
__version__ = "0.2.0"
