"""Pure logic of the paper (UTS, AKD, DWC, wire formats, rounds). Never imports rclpy."""
