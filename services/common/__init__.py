"""What every OpenLoRA service shares: settings, logging, telemetry, errors and the gRPC server kit."""
