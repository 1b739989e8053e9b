// Package target parses the addresses that nitrosign binaries dial or listen
// on, vsock://CID:PORT and tcp://HOST:PORT, and dials them for gRPC.
package target

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"strconv"
	"strings"

	"github.com/mdlayher/vsock"
)

// Scheme is the transport of a Target.
type Scheme string

const (
	// VSOCK is AF_VSOCK: CID and port.
	VSOCK Scheme = "vsock"
	// TCP is TCP over IPv4 or IPv6: host and port.
	TCP Scheme = "tcp"
)

// ReservedVsockPort is the port of nitro-cli's boot heartbeat listener on
// the parent (CID 3), which the enclave's init connects to when it boots;
// nothing of ours uses it, on either side, so the two are never confused.
const ReservedVsockPort = 9000

// LogPort is the parent's vsock port that enclaves ship their log lines
// to (enclave/logship) and the host proxy receives them on
// (host/enclavelog, --enclave-log-port).
const LogPort = 5050

// Target is a parsed transport address.
type Target struct {
	Scheme Scheme
	// CID and Port are set for VSOCK.
	CID  uint32
	Port uint32
	// HostPort is set for TCP ("host:port").
	HostPort string
}

// ErrInvalid is wrapped by every parse error.
var ErrInvalid = errors.New("invalid target")

// Parse parses "vsock://CID:PORT" or "tcp://HOST:PORT". A bare "HOST:PORT" is
// not accepted: the transport must be explicit, since the same port number
// means different things on vsock and TCP.
func Parse(s string) (Target, error) {
	scheme, rest, ok := strings.Cut(s, "://")
	if !ok {
		return Target{}, fmt.Errorf("%w %q: want vsock://CID:PORT or tcp://HOST:PORT", ErrInvalid, s)
	}
	switch Scheme(scheme) {
	case VSOCK:
		cidStr, portStr, ok := strings.Cut(rest, ":")
		if !ok || cidStr == "" || portStr == "" || strings.ContainsAny(rest, "/?#") {
			return Target{}, fmt.Errorf("%w %q: want vsock://CID:PORT", ErrInvalid, s)
		}
		cid, err := parseUint32(cidStr)
		if err != nil {
			return Target{}, fmt.Errorf("%w %q: CID: %v", ErrInvalid, s, err)
		}
		port, err := parseUint32(portStr)
		if err != nil {
			return Target{}, fmt.Errorf("%w %q: port: %v", ErrInvalid, s, err)
		}
		if port == 0 {
			return Target{}, fmt.Errorf("%w %q: port 0", ErrInvalid, s)
		}
		return Target{Scheme: VSOCK, CID: cid, Port: port}, nil
	case TCP:
		host, port, err := net.SplitHostPort(rest)
		if err != nil || strings.ContainsAny(rest, "/?#") {
			return Target{}, fmt.Errorf("%w %q: want tcp://HOST:PORT", ErrInvalid, s)
		}
		p, err := strconv.ParseUint(port, 10, 16)
		if err != nil || p == 0 {
			return Target{}, fmt.Errorf("%w %q: port must be 1-65535", ErrInvalid, s)
		}
		if host == "" {
			return Target{}, fmt.Errorf("%w %q: empty host", ErrInvalid, s)
		}
		return Target{Scheme: TCP, HostPort: rest}, nil
	default:
		return Target{}, fmt.Errorf("%w %q: unknown scheme %q (want vsock or tcp)", ErrInvalid, s, scheme)
	}
}

func parseUint32(s string) (uint32, error) {
	v, err := strconv.ParseUint(s, 10, 32)
	if err != nil || v > math.MaxUint32 {
		return 0, fmt.Errorf("%q is not a 32-bit unsigned number", s)
	}
	return uint32(v), nil
}

// String returns the canonical form, which Parse accepts.
func (t Target) String() string {
	if t.Scheme == VSOCK {
		return fmt.Sprintf("vsock://%d:%d", t.CID, t.Port)
	}
	return "tcp://" + t.HostPort
}

// GRPCTarget is the address to hand to grpc.NewClient together with
// Dialer: the passthrough resolver keeps it away from DNS.
func (t Target) GRPCTarget() string {
	if t.Scheme == VSOCK {
		// The authority a vsock peer sees; it carries no routing meaning.
		return fmt.Sprintf("passthrough:///vsock-%d-%d", t.CID, t.Port)
	}
	return "passthrough:///" + t.HostPort
}

// Dial opens one connection to the target, honouring ctx.
func (t Target) Dial(ctx context.Context) (net.Conn, error) {
	switch t.Scheme {
	case VSOCK:
		// vsock.DialContext (v1.4+) connects non-blocking and gives up when
		// ctx ends, so a dead or absent enclave cannot hang the caller.
		c, err := vsock.DialContext(ctx, t.CID, t.Port, nil)
		if err != nil {
			return nil, err
		}
		return c, nil
	case TCP:
		var d net.Dialer
		return d.DialContext(ctx, "tcp", t.HostPort)
	default:
		return nil, fmt.Errorf("%w: no scheme", ErrInvalid)
	}
}

// Dialer adapts Dial to grpc.WithContextDialer; the address grpc passes is
// ignored because the target is already known.
func (t Target) Dialer() func(context.Context, string) (net.Conn, error) {
	return func(ctx context.Context, _ string) (net.Conn, error) { return t.Dial(ctx) }
}
