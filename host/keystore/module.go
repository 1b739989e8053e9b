package keystore

import (
	"context"
	"errors"
	"fmt"
	"net"

	"github.com/mdlayher/vsock"
	"go.uber.org/fx"
	"go.uber.org/zap"
)

// Module serves HostService on vsock port Config.Port (any CID) with the
// app; nothing when it is 0. OnStart checks the keyset's directory and
// logs what it holds, loads the credentials chain (LoadCredentials; no
// credential is fetched before an enclave asks, but one attempt is made in
// the background to log whether any are there), listens and serves; OnStop
// drains within its context.
var Module = fx.Module("keystore", fx.Invoke(register))

// ListenFunc opens the listener HostService serves on. Without one in the
// graph it is vsock.Listen(Config.Port); tests give a TCP loopback one.
type ListenFunc func() (net.Listener, error)

// Params are Module's dependencies.
type Params struct {
	fx.In

	Config    Config
	Log       *zap.Logger
	Lifecycle fx.Lifecycle
	// Listen, when the graph has one, replaces the vsock listener.
	Listen ListenFunc `optional:"true"`
	// Credentials, when the graph has one, replaces LoadCredentials.
	Credentials *Credentials `optional:"true"`
}

func register(p Params) error {
	if p.Config.Port == 0 {
		return nil
	}
	cfg := p.Config.withDefaults()
	store, err := NewStore(cfg.Path, p.Log)
	if err != nil {
		return fmt.Errorf("host service: %w", err)
	}
	log := p.Log.Named("hostservice")
	var (
		srv         *Server
		served      = make(chan struct{})
		probed      = make(chan struct{})
		probeCtx    context.Context
		cancelProbe context.CancelFunc
	)
	p.Lifecycle.Append(fx.Hook{
		OnStart: func(ctx context.Context) error {
			if err := store.Check(); err != nil {
				return fmt.Errorf("host service: %w", err)
			}
			creds := p.Credentials
			if creds == nil {
				if creds, err = LoadCredentials(ctx, p.Log); err != nil {
					return fmt.Errorf("host service: %w", err)
				}
			}
			listen := p.Listen
			if listen == nil {
				listen = func() (net.Listener, error) { return vsock.Listen(cfg.Port, nil) }
			}
			l, err := listen()
			if err != nil {
				return fmt.Errorf("host service: listen on vsock port %d: %w (turn it off with --enclave-host-port 0)", cfg.Port, err)
			}
			srv = NewServer(cfg, store, creds, p.Log)
			log.Info("serving the enclaves' host service: sealed keyset and AWS credentials", zap.Uint32("vsock_port", cfg.Port),
				zap.String("addr", l.Addr().String()), zap.String("keyset_file", cfg.Path), zap.String("credentials_looked_for_in", creds.Where()))
			go func() {
				defer close(served)
				if err := srv.Serve(l); err != nil {
					log.Error("host service stopped", zap.Error(err))
				}
			}()
			probeCtx, cancelProbe = context.WithCancel(context.Background())
			go func() {
				defer close(probed)
				probeCredentials(probeCtx, creds, log)
			}()
			return nil
		},
		OnStop: func(ctx context.Context) error {
			cancelProbe()
			srv.Stop(ctx)
			<-served
			<-probed
			return nil
		},
	})
	return nil
}

// probeCredentials gets credentials once, to log whether enclaves will get
// any: their source and expiry, never their values.
func probeCredentials(ctx context.Context, creds *Credentials, log *zap.Logger) {
	c, err := creds.Retrieve(ctx)
	if ctx.Err() != nil {
		return
	}
	if err != nil {
		cause := err
		var ce *CredentialsError
		if errors.As(err, &ce) {
			cause = ce.Cause()
		}
		log.Warn("no AWS credentials for enclaves yet: enclaves in sealed mode cannot reach KMS until there are; the host tries again at each enclave's request",
			zap.String("looked_in", creds.Where()), zap.String("cause", cause.Error()))
		return
	}
	fields := []zap.Field{zap.String("source", c.Source), zap.Bool("can_expire", c.CanExpire)}
	if c.CanExpire {
		fields = append(fields, zap.Time("expires", c.Expires))
	}
	log.Info("AWS credentials for enclaves available", fields...)
}
