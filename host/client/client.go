// Package client is the Go client of nitrosign: it dials either end of the
// system (vsock://CID:PORT for the enclave directly, tcp://HOST:PORT for the
// host proxy) over a pool of connections and exposes the typed services.
// The CLI, the benchmark and the tests use it.
package client

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/nitrosign/nitrosign/host/pool"
	"github.com/nitrosign/nitrosign/internal/callauth"
	"github.com/nitrosign/nitrosign/internal/target"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// Options tune Dial.
type Options struct {
	// Connections is the number of HTTP/2 connections calls are spread
	// over. Default 1.
	Connections int
	// HealthCheck makes a connection usable only while the server's
	// grpc.health.v1 reports SERVING. Default false for the client: a
	// one-shot CLI call against a draining server should get the server's
	// own answer, not a local "no ready connection".
	HealthCheck bool
	// Logger receives connection-state logs; nil discards them.
	Logger *zap.Logger
	// TLS, when not nil, secures the connections to a tcp:// target (the
	// host proxy's external port); see internal/tlsconfig.ClientConfig for
	// the flags that build it. The enclave's vsock port has no TLS: a
	// vsock:// target with TLS is an error. Default nil (plaintext).
	TLS *tls.Config
	// Identity, when not nil, authenticates the calls the enclave
	// authenticates (Sign and KeyAdminService, callauth.DefaultMethods) as
	// this caller: the enclave checks them itself, through the proxy or
	// direct. By default the first such call opens a session (signed with
	// the identity) and the others carry its MAC
	// (callauth.SessionUnaryClientInterceptor); see SignEachCall. Its
	// interceptor runs after any in DialOptions, closest to the wire.
	// Default nil: calls are anonymous.
	Identity *callauth.Identity
	// SignEachCall signs every call with Identity instead of opening a
	// session (callauth.UnaryClientInterceptor): one round trip fewer for
	// a client that makes a single call, a signature verification more in
	// the enclave for every call.
	SignEachCall bool
	// DialOptions are appended to the pool's.
	DialOptions []grpc.DialOption
}

// Client talks to one target.
type Client struct {
	target target.Target
	pool   *pool.Pool

	Echo        pb.EchoServiceClient
	Signer      pb.SignerServiceClient
	Attestation pb.AttestationServiceClient
	// KeyAdmin rotates a sealed keyset (the enclave's --key-mode sealed).
	KeyAdmin pb.KeyAdminServiceClient
	Health   healthpb.HealthClient
}

// Dial parses addr, opens the connections and waits until one is ready or
// ctx ends. The error says which target could not be reached.
func Dial(ctx context.Context, addr string, o Options) (*Client, error) {
	t, err := target.Parse(addr)
	if err != nil {
		return nil, err
	}
	dialOpts := o.DialOptions
	if o.Identity != nil {
		// Last: interceptors chain in order, so this one sees the request
		// after any other has changed it, and signs each attempt of a
		// retrying interceptor anew.
		dialOpts = append(dialOpts[:len(dialOpts):len(dialOpts)], grpc.WithChainUnaryInterceptor(callauth.ClientInterceptor(o.Identity, o.SignEachCall)))
	}
	if o.TLS != nil {
		if t.Scheme != target.TCP {
			return nil, errors.New("TLS is for the host proxy (tcp://HOST:PORT); the enclave's vsock port is plaintext")
		}
		dialOpts = append([]grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(o.TLS))}, dialOpts...)
	}
	cfg := pool.DefaultConfig()
	cfg.Size = 1
	if o.Connections > 0 {
		cfg.Size = o.Connections
	}
	cfg.HealthCheck = o.HealthCheck
	p, err := pool.New(t, cfg, o.Logger, dialOpts...)
	if err != nil {
		return nil, err
	}
	if err := p.WaitReady(ctx); err != nil {
		_ = p.Close()
		return nil, fmt.Errorf("cannot reach %s (is the %s running?): %w", t, who(t), err)
	}
	return &Client{
		target:      t,
		pool:        p,
		Echo:        pb.NewEchoServiceClient(p),
		Signer:      pb.NewSignerServiceClient(p),
		Attestation: pb.NewAttestationServiceClient(p),
		KeyAdmin:    pb.NewKeyAdminServiceClient(p),
		Health:      healthpb.NewHealthClient(p),
	}, nil
}

func who(t target.Target) string {
	if t.Scheme == target.VSOCK {
		return "enclave signer"
	}
	return "host proxy"
}

// Target is the address the client dialed.
func (c *Client) Target() target.Target { return c.target }

// Conn is the underlying connection pool, for calls to other services.
func (c *Client) Conn() grpc.ClientConnInterface { return c.pool }

// Stats reports per-connection state and call counts.
func (c *Client) Stats() []pool.ConnStats { return c.pool.Stats() }

// Close closes every connection.
func (c *Client) Close() error { return c.pool.Close() }
