package enclave

import "go.uber.org/fx"

// attestModule wires attestation into the graph.
func attestModule(Config) fx.Option { return fx.Options() }
