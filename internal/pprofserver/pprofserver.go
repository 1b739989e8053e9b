// Package pprofserver serves Go's runtime profiles (net/http/pprof) on a
// loopback address, for profiling a benchmark run:
//
//	go tool pprof http://127.0.0.1:6060/debug/pprof/profile?seconds=10
//
// It is off unless an address is given, and only ever listens on loopback:
// profiles and goroutine dumps describe the process's internals and must not
// be reachable from the network.
package pprofserver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"time"

	"go.uber.org/fx"
	"go.uber.org/zap"
)

// Config configures the profiling endpoint.
type Config struct {
	// Listen is the loopback HOST:PORT to serve /debug/pprof/ on, e.g.
	// 127.0.0.1:6060. Empty (the default) serves nothing.
	Listen string
}

// Validate accepts an empty address or a loopback HOST:PORT.
func (c Config) Validate() error {
	if c.Listen == "" {
		return nil
	}
	host, port, err := net.SplitHostPort(c.Listen)
	if err != nil || port == "" {
		return fmt.Errorf("pprof listen address %q: want a loopback HOST:PORT such as 127.0.0.1:6060", c.Listen)
	}
	if host == "localhost" {
		return nil
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("pprof listen address %q: profiles may only be served on loopback (127.0.0.1 or [::1])", c.Listen)
	}
	return nil
}

// Handler returns the pprof endpoints on a mux of their own (not
// http.DefaultServeMux, which anything in the process may add to).
func Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

// Server is a running profiling endpoint.
type Server struct {
	srv  *http.Server
	lis  net.Listener
	done chan struct{}
}

// Start listens on c.Listen and serves in the background. It returns nil,
// nil when c.Listen is empty.
func Start(ctx context.Context, c Config, log *zap.Logger) (*Server, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	if c.Listen == "" {
		return nil, nil
	}
	if log == nil {
		log = zap.NewNop()
	}
	var lc net.ListenConfig
	l, err := lc.Listen(ctx, "tcp", c.Listen)
	if err != nil {
		return nil, fmt.Errorf("pprof: listen on %s: %w", c.Listen, err)
	}
	s := &Server{
		// Profiles take as long as asked (?seconds=N): no write timeout.
		srv:  &http.Server{Handler: Handler(), ReadHeaderTimeout: 5 * time.Second},
		lis:  l,
		done: make(chan struct{}),
	}
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("pprof server stopped", zap.Error(err))
		}
	}()
	log.Info("serving pprof profiles", zap.String("url", "http://"+l.Addr().String()+"/debug/pprof/"))
	return s, nil
}

// Addr is the address served.
func (s *Server) Addr() net.Addr { return s.lis.Addr() }

// Stop closes the listener and every connection (a profile being taken is
// cut) and waits for the serve loop to end.
func (s *Server) Stop() error {
	err := s.srv.Close()
	<-s.done
	return err
}

// Option runs the profiling endpoint with an fx app: it starts with the app
// and stops with it. With an empty c.Listen it adds nothing.
func Option(c Config) fx.Option {
	if c.Listen == "" {
		return fx.Options()
	}
	return fx.Invoke(func(lc fx.Lifecycle, log *zap.Logger) {
		var s *Server
		lc.Append(fx.Hook{
			OnStart: func(ctx context.Context) error {
				var err error
				s, err = Start(ctx, c, log.Named("pprof"))
				return err
			},
			OnStop: func(context.Context) error {
				if s == nil {
					return nil
				}
				return s.Stop()
			},
		})
	})
}
