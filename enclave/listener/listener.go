// Package listener opens the enclave's only door: an AF_VSOCK listener.
// No other package of the enclave calls vsock.Listen; the server takes a
// net.Listener, so tests and benchmarks inject TCP or in-memory listeners.
package listener

import (
	"context"
	"errors"
	"fmt"
	"net"

	"github.com/mdlayher/vsock"
	"go.uber.org/fx"
	"go.uber.org/zap"

	"github.com/nitrosign/nitrosign/internal/target"
)

// CIDAny binds on every context ID of this machine (VMADDR_CID_ANY).
const CIDAny uint32 = 0xFFFFFFFF

// DefaultPort is the vsock port the signer listens on unless told otherwise.
const DefaultPort uint32 = 5005

// Config says where to listen.
type Config struct {
	// CID to bind: CIDAny (default when zero is not set explicitly by the
	// binary) or a specific context ID such as 1 (local loopback).
	CID uint32
	// Port to bind, default 5005. 9000 is refused: it is the port of
	// nitro-cli's heartbeat listener on the parent, which the enclave's
	// init connects to at boot.
	Port uint32
}

// Validate reports a precise error for an unusable port.
func (c Config) Validate() error {
	switch c.Port {
	case 0:
		return errors.New("vsock port 0: choose a port, e.g. 5005")
	case target.ReservedVsockPort:
		return fmt.Errorf("vsock port %d is reserved by nitro-cli for the enclave boot heartbeat", target.ReservedVsockPort)
	case 0xFFFFFFFF:
		return errors.New("vsock port 4294967295 (VMADDR_PORT_ANY) is not a fixed port")
	}
	return nil
}

// Params are New's dependencies.
type Params struct {
	fx.In

	Config    Config
	Logger    *zap.Logger
	Lifecycle fx.Lifecycle
}

// Module provides the vsock net.Listener.
var Module = fx.Module("listener", fx.Provide(New))

// New binds the vsock listener at once, so a wrong CID or a port in use fails
// start-up with a clear error, and closes it when the app stops (the gRPC
// server's GracefulStop may have closed it first: that is not an error).
func New(p Params) (net.Listener, error) {
	if err := p.Config.Validate(); err != nil {
		return nil, err
	}
	l, err := vsock.ListenContextID(p.Config.CID, p.Config.Port, nil)
	if err != nil {
		return nil, fmt.Errorf("listen on vsock CID %s port %d: %w%s", cidName(p.Config.CID), p.Config.Port, err, hint(p.Config.CID))
	}
	p.Logger.Named("listener").Info("listening on vsock", zap.String("addr", l.Addr().String()))
	p.Lifecycle.Append(fx.StopHook(func(context.Context) error {
		if err := l.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			return err
		}
		return nil
	}))
	return l, nil
}

func cidName(cid uint32) string {
	if cid == CIDAny {
		return "any"
	}
	return fmt.Sprint(cid)
}

func hint(cid uint32) string {
	if cid == vsock.Local {
		return " (CID 1 needs the vsock_loopback kernel module: modprobe vsock_loopback; `make e2e` runs in a micro-VM where the kernel lacks it)"
	}
	return ""
}
