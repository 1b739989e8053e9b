package enclave

import (
	"fmt"

	"go.uber.org/fx"

	"github.com/nitrosign/nitrosign/enclave/attest"
	"github.com/nitrosign/nitrosign/enclave/server"
	"github.com/nitrosign/nitrosign/enclave/signer"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// attestModule wires attestation into the graph: the NSM seeds the kernel
// entropy pool before the signer makes its keys, and the attester commits
// to the signer's keys and serves through the gRPC server.
//
// It also keeps deterministic development keys out of real enclaves: the
// signer's Seeder is the NSM, so before any key is made it is known
// whether the NSM is the real device (the simulated-NSM flag is then
// ignored) or the simulation; with a real one a dev key seed is refused
// and the enclave does not start.
func attestModule(c Config) fx.Option {
	seeded := c.Signer.DevKeySeed != nil
	anonymous := c.Authz.DevAllowAnonymous
	return fx.Options(
		fx.Supply(c.Attest),
		attest.Module,
		fx.Provide(
			func(s attest.Seeder, n attest.NSM) (signer.Seeder, error) {
				_, simulated := n.(attest.Simulation)
				if seeded && !simulated {
					return nil, fmt.Errorf("%w (an NSM device exists: this is a real enclave)", errDevKeySeed)
				}
				if anonymous && !simulated {
					return nil, fmt.Errorf("%w (an NSM device exists: this is a real enclave)", errDevAnonymous)
				}
				return s, nil
			},
			// Attestation commits to the keys that may sign.
			func(s *signer.Signer) attest.KeySource { return enabledKeys{s} },
			func(a *attest.Attester) server.Attester { return a },
		),
	)
}

// enabledKeys lists the signer's enabled keys: a disabled key cannot sign,
// so attestation does not vouch for it.
type enabledKeys struct{ s *signer.Signer }

func (e enabledKeys) Keys() []*pb.KeyInfo { return e.s.EnabledKeys() }
