"""The node: lifecycles that drive the overlay, the data plane and the protocol machines."""
