"""The network: the UNet of the released architecture and its SPADE norm."""
