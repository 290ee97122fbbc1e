"""Box configuration: firmware profiles (``firmware_configs/*.yaml``) loaded and validated.

Configuration of a device, not wire protocol: it may import ``protocol`` (the preprocessing steps
and training hyper-parameters it shares with manifests and tasks), never the reverse.
"""
