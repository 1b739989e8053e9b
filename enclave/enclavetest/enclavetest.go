// Package enclavetest runs the real enclave graph (signer, server, and
// attestation with the simulated NSM) on a TCP loopback listener, for tests
// and benchmarks of everything around it. The shipped enclave binary never
// listens on TCP; this package is not linked into it.
package enclavetest

import (
	"context"
	"net"
	"strconv"
	"testing"
	"time"

	"go.uber.org/fx"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/nitrosign/nitrosign/enclave"
)

// Enclave is a running in-process enclave.
type Enclave struct {
	// Addr is "127.0.0.1:PORT".
	Addr string
	// Target is "tcp://127.0.0.1:PORT".
	Target string
	app    *fx.App
}

// DefaultConfig is a fast test configuration: default key sizes, Ed25519
// on, simulated NSM, anonymous callers allowed (a test of authorisation
// turns it off and gives a policy), no audit trail shipped.
func DefaultConfig() enclave.Config {
	c := enclave.DefaultConfig()
	c.Attest.DevSimulatedNSM = true
	c.Authz.DevAllowAnonymous = true
	c.AuditShip = "" // no host to take it; a test of the audit trail sets one
	return c
}

// Start runs the enclave on 127.0.0.1:port (0 picks a free port) and stops
// it at test cleanup.
func Start(tb testing.TB, c enclave.Config, port int) *Enclave {
	tb.Helper()
	e, err := Run(c, zaptest.NewLogger(tb, zaptest.Level(zap.WarnLevel)), port)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = e.Stop() })
	return e
}

// Run starts an enclave outside of a test, e.g. in a benchmark harness.
func Run(c enclave.Config, log *zap.Logger, port int) (*Enclave, error) {
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		return nil, err
	}
	app := fx.New(enclave.Options(c, log), fx.Supply(fx.Annotate(l, fx.As(new(net.Listener)))))
	if err := app.Err(); err != nil {
		l.Close()
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := app.Start(ctx); err != nil {
		l.Close()
		return nil, err
	}
	return &Enclave{Addr: l.Addr().String(), Target: "tcp://" + l.Addr().String(), app: app}, nil
}

// Stop drains and stops the enclave.
func (e *Enclave) Stop() error {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	return e.app.Stop(ctx)
}
