"""What a device sends the cloud about a selected sample, beside UTS's own packings.

* :mod:`.basis`: the ``'basis'`` packing, kept tokens transform-coded in a token basis shared
  by device and cloud (versioned, bound to the vision space), under a byte budget.
* :mod:`.image`: the image uplink mode, the selected frame as a JPEG, for pairs that do not
  share a vision encoder (the cloud runs its own).
"""
