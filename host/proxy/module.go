package proxy

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/mdlayher/vsock"
	"go.uber.org/fx"
	"go.uber.org/zap"

	"github.com/nitrosign/nitrosign/host/auditlog"
	"github.com/nitrosign/nitrosign/host/enclavelog"
	"github.com/nitrosign/nitrosign/host/keystore"
	"github.com/nitrosign/nitrosign/host/kmsforward"
	"github.com/nitrosign/nitrosign/host/metrics"
	"github.com/nitrosign/nitrosign/host/sdnotify"
	"github.com/nitrosign/nitrosign/internal/logging"
)

// Module provides the *Proxy and runs it with the app: OnStart listens on
// Config.Listen (or serves an injected net.Listener) and serves in a
// goroutine; OnStop drains and stops (see Proxy.Stop). Neither blocks
// beyond its context. With TLS, SIGHUP reloads the certificate. Then it
// notifies systemd (package sdnotify): READY=1 once a pooled connection
// is ready, watchdog pings, STOPPING=1.
var Module = fx.Module("proxy",
	fx.Provide(provide, provideNotifier),
	fx.Invoke(func(*Proxy, *sdnotify.Notifier) {}), // a proxy nobody asks for must still run
)

// Params are the proxy's dependencies in an fx graph.
type Params struct {
	fx.In

	Config     Config
	Upstreams  *Upstreams
	Log        *zap.Logger
	Lifecycle  fx.Lifecycle
	Shutdowner fx.Shutdowner
	// Listener, when the graph has one, is served instead of listening on
	// Config.Listen. Tests inject a 127.0.0.1:0 listener this way.
	Listener net.Listener `optional:"true"`
	// Observer, when the graph has one, is told about every call
	// (Options wires *metrics.Metrics).
	Observer Observer `optional:"true"`
}

func provide(p Params) (*Proxy, error) {
	px, err := New(p.Config, p.Upstreams, p.Log, WithObserver(p.Observer))
	if err != nil {
		return nil, err
	}
	if px.TLSEnabled() {
		p.Lifecycle.Append(reloadOnSIGHUP(px))
	}
	p.Lifecycle.Append(fx.Hook{
		OnStart: func(ctx context.Context) error {
			l := p.Listener
			if l == nil {
				var lc net.ListenConfig
				var err error
				if l, err = lc.Listen(ctx, "tcp", p.Config.Listen); err != nil {
					// This hook did not start, so fx will not call its
					// OnStop: stop here (the upstream connections).
					_ = px.Stop(ctx)
					return fmt.Errorf("proxy: listen on %s: %w", p.Config.Listen, err)
				}
			}
			go func() {
				if err := px.Serve(l); err != nil {
					px.log.Error("proxy stopped serving", zap.Error(err))
					_ = p.Shutdowner.Shutdown(fx.ExitCode(1))
				}
			}()
			return nil
		},
		OnStop: px.Stop,
	})
	return px, nil
}

// reloadOnSIGHUP reloads the proxy's TLS files on every SIGHUP (what
// `systemctl reload` sends, see deploy/nitrosign-proxy.service) until the
// app stops. A failed reload is logged and the previous certificate kept.
func reloadOnSIGHUP(px *Proxy) fx.Hook {
	sig := make(chan os.Signal, 1)
	done := make(chan struct{})
	stopped := make(chan struct{})
	return fx.Hook{
		OnStart: func(context.Context) error {
			signal.Notify(sig, syscall.SIGHUP)
			go func() {
				defer close(stopped)
				for {
					select {
					case <-sig:
						if err := px.ReloadTLS(); err != nil {
							px.log.Error("SIGHUP: TLS reload failed", zap.Error(err))
						}
					case <-done:
						return
					}
				}
			}()
			return nil
		},
		OnStop: func(context.Context) error {
			signal.Stop(sig)
			close(done)
			<-stopped
			return nil
		},
	}
}

// provideNotifier follows the upstreams for systemd once the proxy serves: it
// depends on *Proxy, so its start hook runs after the proxy listens, and
// its stop hook (STOPPING=1) before the proxy drains.
func provideNotifier(px *Proxy, log *zap.Logger, lc fx.Lifecycle) *sdnotify.Notifier {
	n := sdnotify.New(px, px.Alive, log)
	lc.Append(fx.Hook{
		OnStart: func(context.Context) error { return n.Start() },
		OnStop:  func(context.Context) error { return n.Stop() },
	})
	return n
}

// Options is the whole nitrosign-proxy application for cfg: logger, fx
// event logging, upstream connections, metrics (served when
// cfg.Metrics.Listen is set), the services for enclaves on vsock (log
// receiver, host service with the sealed keyset and credentials, KMS
// forwarder, audit receiver; each when its port is set) and proxy. The binary runs exactly this, and
// its fx.ValidateApp test validates exactly this.
func Options(cfg Config) fx.Option {
	return fx.Options(
		fx.Supply(cfg),
		fx.Provide(
			newLogger,
			provideUpstreams,
			func(u *Upstreams) metrics.Upstream { return u },
			func(c Config) metrics.Config { return c.Metrics },
			func(m *metrics.Metrics) Observer { return m },
			func(c Config) enclavelog.Config { return enclavelog.Config{Port: c.EnclaveLogPort} },
			func(c Config) keystore.Config { return keystore.Config{Port: c.EnclaveHostPort, Path: c.KeysetFile} },
			func(c Config) auditlog.Config {
				return auditlog.Config{Port: c.EnclaveAuditPort, Path: c.AuditFile, LogDecisions: c.AuditLogDecisions}
			},
		),
		logging.FxLogger(),
		// The proxy's stop waits up to GracefulStopTimeout; leave fx room
		// for it and for closing the upstream connections.
		fx.StopTimeout(cfg.GracefulStopTimeout+5*time.Second),
		metrics.Module,
		enclavelog.Module,
		keystore.Module,
		kmsForwardModule,
		auditlog.Module,
		Module,
	)
}

// kmsForwardModule relays the enclaves' KMS connections (package
// kmsforward) from vsock port Config.KMSForwardPort (any CID) to
// Config.KMSDestination, with the app; nothing when the port is 0.
var kmsForwardModule = fx.Module("kmsforward", fx.Invoke(registerKMSForward))

// KMSForwardListen, when the graph has one, opens the KMS forwarder's
// listener instead of vsock.Listen (tests: a TCP loopback listener).
type KMSForwardListen func() (net.Listener, error)

type kmsForwardParams struct {
	fx.In

	Config    Config
	Log       *zap.Logger
	Lifecycle fx.Lifecycle
	Listen    KMSForwardListen `optional:"true"`
}

func registerKMSForward(p kmsForwardParams) error {
	port := p.Config.KMSForwardPort
	if port == 0 {
		return nil
	}
	dest, err := p.Config.KMSDestination()
	if err != nil {
		return err
	}
	f, err := kmsforward.New(kmsforward.Config{Destination: dest}, p.Log)
	if err != nil {
		return err
	}
	listen := p.Listen
	if listen == nil {
		listen = func() (net.Listener, error) { return vsock.Listen(port, nil) }
	}
	log := p.Log.Named("kmsforward")
	var l net.Listener
	served := make(chan struct{})
	p.Lifecycle.Append(fx.Hook{
		OnStart: func(context.Context) error {
			var err error
			if l, err = listen(); err != nil {
				// Nothing of f runs before Serve; Close ends its context.
				f.Close()
				return fmt.Errorf("KMS forwarder: listen on vsock port %d: %w (turn it off with --kms-forward-port 0)", port, err)
			}
			log.Info("forwarding the enclaves' KMS connections", zap.Uint32("vsock_port", port), zap.String("addr", l.Addr().String()),
				zap.String("destination", dest), zap.Bool("endpoint_override", p.Config.KMSEndpoint != ""))
			go func() {
				defer close(served)
				if err := f.Serve(l); err != nil {
					log.Error("KMS forwarder stopped", zap.Error(err))
				}
			}()
			return nil
		},
		OnStop: func(context.Context) error {
			_ = l.Close()
			<-served
			f.Close()
			return nil
		},
	})
	return nil
}

// provideUpstreams prepares the upstream connections; the proxy starts
// and closes them. Should the graph fail before the proxy is built, the
// stop hook closes them (Close is idempotent).
func provideUpstreams(c Config, log *zap.Logger, lc fx.Lifecycle) (*Upstreams, error) {
	u, err := NewUpstreams(c, log)
	if err != nil {
		return nil, err
	}
	lc.Append(fx.StopHook(u.Close))
	return u, nil
}

// newLogger builds the process logger. Everything else depends on it, so its
// stop hook is appended first and runs last: it flushes what stopping logged.
func newLogger(c Config, lc fx.Lifecycle) (*zap.Logger, error) {
	log, err := logging.New(c.Log, os.Stderr)
	if err != nil {
		return nil, err
	}
	lc.Append(fx.StopHook(func() { _ = log.Sync() }))
	return log, nil
}
