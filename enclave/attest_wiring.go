package enclave

import (
	"go.uber.org/fx"

	"github.com/nitrosign/nitrosign/enclave/attest"
	"github.com/nitrosign/nitrosign/enclave/server"
	"github.com/nitrosign/nitrosign/enclave/signer"
)

// attestModule wires attestation into the graph: the NSM seeds the kernel
// entropy pool before the signer makes its keys, and the attester commits
// to the signer's keys and serves through the gRPC server.
func attestModule(c Config) fx.Option {
	return fx.Options(
		fx.Supply(c.Attest),
		attest.Module,
		fx.Provide(
			func(s attest.Seeder) signer.Seeder { return s },
			func(s *signer.Signer) attest.KeySource { return s },
			func(a *attest.Attester) server.Attester { return a },
		),
	)
}
