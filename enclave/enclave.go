// Package enclave assembles the enclave signer: one fx graph from the
// listener, signer, keyset (sealed keys), attestation, stats and server
// modules. The binary adds the
// vsock listener; tests and benchmarks supply their own net.Listener.
package enclave

import (
	"errors"
	"fmt"

	"go.uber.org/fx"
	"go.uber.org/zap"

	"github.com/nitrosign/nitrosign/enclave/attest"
	"github.com/nitrosign/nitrosign/enclave/authz"
	"github.com/nitrosign/nitrosign/enclave/keyset"
	"github.com/nitrosign/nitrosign/enclave/listener"
	"github.com/nitrosign/nitrosign/enclave/sealing"
	"github.com/nitrosign/nitrosign/enclave/server"
	"github.com/nitrosign/nitrosign/enclave/signer"
	"github.com/nitrosign/nitrosign/enclave/stats"
	"github.com/nitrosign/nitrosign/internal/logging"
	"github.com/nitrosign/nitrosign/internal/target"
)

// Config is the whole enclave's configuration, one part per module.
type Config struct {
	Log logging.Config
	// LogShip is where the log lines go besides stderr, for the host to
	// log them (package logship): vsock://3:5050, the parent, by default;
	// empty: nowhere. An enclave's console is readable only in debug mode.
	LogShip  string
	Listener listener.Config
	Signer   signer.Config
	// Keyset is where a sealed keyset and KMS are (Signer.KeyMode
	// "sealed" only).
	Keyset keyset.Config
	// Authz is who may sign and administer keys (package authz).
	Authz authz.Config
	// AuditShip is where the audit trail of signing decisions goes
	// (package audit; the host's nitrosign-proxy --enclave-audit-port):
	// vsock://3:5052 by default. Empty, development only: none.
	AuditShip string
	Server    server.Config
	Attest    attest.Config
}

// DefaultConfig returns the documented defaults of every part: what
// nitrosign-enclave runs with when given no flags.
func DefaultConfig() Config {
	return Config{
		Log:       logging.Config{Level: "info", Format: "json"},
		LogShip:   fmt.Sprintf("vsock://%d:%d", parentCID, target.LogPort),
		AuditShip: fmt.Sprintf("vsock://%d:%d", parentCID, DefaultAuditPort),
		Listener:  listener.Config{CID: listener.CIDAny, Port: listener.DefaultPort},
		Signer:    signer.Config{KeyMode: signer.Ephemeral, RSABits: 2048, ECCCurve: "P-256", Ed25519: true},
		Keyset:    keyset.DefaultConfig(),
		Server:    server.DefaultConfig(),
	}
}

// Validate checks every part and reports every one that is wrong.
func (c Config) Validate() error {
	var ks error
	if c.Signer.IsSealed() {
		ks = c.Keyset.Validate()
	}
	return errors.Join(c.Log.Validate(), c.validateLogShip(), c.validateAuditShip(), c.Listener.Validate(), c.Signer.Validate(), ks, c.Authz.Validate(), c.Server.Validate(), c.Attest.Validate(), c.devOnly())
}

// parentCID is the parent instance's vsock CID, seen from an enclave.
const parentCID = 3

// DefaultAuditPort is the host's audit receiver's vsock port.
const DefaultAuditPort = 5052

func (c Config) validateLogShip() error {
	if c.LogShip == "" {
		return nil
	}
	t, err := target.Parse(c.LogShip)
	if err != nil {
		return fmt.Errorf("log shipping target: %w", err)
	}
	if t.Scheme == target.VSOCK && t.Port == target.ReservedVsockPort {
		return fmt.Errorf("log shipping target %q: port %d is nitro-cli's boot heartbeat", c.LogShip, t.Port)
	}
	return nil
}

func (c Config) validateAuditShip() error {
	if c.AuditShip == "" {
		return nil
	}
	t, err := target.Parse(c.AuditShip)
	if err != nil {
		return fmt.Errorf("audit target: %w", err)
	}
	if t.Scheme == target.VSOCK && t.Port == target.ReservedVsockPort {
		return fmt.Errorf("audit target %q: port %d is nitro-cli's boot heartbeat", c.AuditShip, t.Port)
	}
	return nil
}

// errDevKeySeed refuses a dev key seed outside development.
var errDevKeySeed = errors.New("--dev-key-seed is for development only and needs --dev-simulated-nsm: " +
	"anyone who knows the seed has the keys, and a real enclave never derives its keys from one")

// errDevAnonymous refuses anonymous signing outside development.
var errDevAnonymous = errors.New("--dev-allow-anonymous is for development only and needs --dev-simulated-nsm: " +
	"a real enclave signs only for the callers its policy names")

// devOnly refuses development-only settings where the simulated NSM is not
// asked for: deterministic keys (signer.Config.DevKeySeed) and anonymous
// callers (authz.Config.DevAllowAnonymous). Where a real NSM exists the
// simulated one is ignored, and so they are refused at start-up too
// (attestModule).
func (c Config) devOnly() error {
	var errs []error
	if c.Signer.DevKeySeed != nil && !c.Attest.DevSimulatedNSM {
		errs = append(errs, errDevKeySeed)
	}
	if c.Authz.DevAllowAnonymous && !c.Attest.DevSimulatedNSM {
		errs = append(errs, errDevAnonymous)
	}
	if c.AuditShip == "" && !c.Attest.DevSimulatedNSM {
		errs = append(errs, errAuditOff)
	}
	return errors.Join(errs...)
}

// Options is the enclave's graph without a listener: the binary adds
// listener.Module, tests fx.Supply a net.Listener. log is the root logger.
func Options(c Config, log *zap.Logger) fx.Option {
	keys := fx.Options()
	if c.Signer.IsSealed() {
		keys = fx.Options(
			fx.Supply(c.Keyset),
			fx.Provide(func(n attest.NSM) sealing.Attester { return n }),
			keyset.Module,
		)
	}
	return fx.Options(
		fx.Supply(log, c.Signer, c.Server, c.Authz),
		logging.FxLogger(),
		signer.Module,
		keys,
		auditModule(c),
		authzModule(),
		attestModule(c),
		server.Module,
		statsModule(),
	)
}

// authzModule authenticates and authorises Sign and KeyAdminService
// (server.Params.Authorizer), and gives attestation the policy to commit
// to.
func authzModule() fx.Option {
	return fx.Options(
		fx.Provide(
			authz.New,
			func(a *authz.Authorizer) server.Authorizer { return a },
			func(a *authz.Authorizer) attest.PolicySource { return a },
		),
	)
}

// statsModule counts what the enclave does and serves the counts
// (server.Params.Stats): the NSM's calls and the signer's key generation
// are observed by decorating the values the other modules provide, so
// none of them depends on stats.
func statsModule() fx.Option {
	return fx.Options(
		stats.Module,
		fx.Decorate(
			func(n attest.NSM, s *stats.Stats) attest.NSM { return s.WrapNSM(n) },
			func(sd attest.Seeder, s *stats.Stats) attest.Seeder { return s.WrapSeeder(sd) },
			func(sg *signer.Signer, s *stats.Stats) *signer.Signer {
				s.ObserveKeys(sg.Keys(), sg.GenerationTimes())
				return sg
			},
		),
	)
}

// VsockOptions is the graph the shipped binary runs: Options plus the vsock
// listener. It is the only way the enclave listens.
func VsockOptions(c Config, log *zap.Logger) fx.Option {
	return fx.Options(Options(c, log), fx.Supply(c.Listener), listener.Module)
}
