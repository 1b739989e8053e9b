package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/fx"
	"go.uber.org/zap"
)

// Config configures the metrics endpoint.
type Config struct {
	// Listen is the TCP HOST:PORT serving GET /metrics in the Prometheus
	// text format, plain HTTP. Empty (the default) serves nothing: metrics
	// are opt-in, so that no second port opens unasked, and no default can
	// collide with Prometheus's own 9090 on the same host. The systemd
	// unit sets 127.0.0.1:9464. Any non-loopback address is logged as a
	// warning: the page reveals call volumes, not secrets.
	Listen string
	// EnclaveScrapeTimeout bounds the enclave stats call each scrape
	// makes. Default 2s (DefaultEnclaveScrapeTimeout).
	EnclaveScrapeTimeout time.Duration
}

// Validate checks Listen's form and the timeout.
func (c Config) Validate() error {
	var errs []error
	if c.Listen != "" {
		_, port, err := net.SplitHostPort(c.Listen)
		if err != nil {
			errs = append(errs, fmt.Errorf("metrics listen address %q: want HOST:PORT, e.g. 127.0.0.1:9464", c.Listen))
		} else if p, err := strconv.ParseUint(port, 10, 16); err != nil || (p == 0 && port != "0") {
			errs = append(errs, fmt.Errorf("metrics listen address %q: port must be a number 0-65535", c.Listen))
		}
	}
	if c.EnclaveScrapeTimeout < 0 {
		errs = append(errs, fmt.Errorf("enclave scrape timeout %v: must be >= 0 (0 = default %v)", c.EnclaveScrapeTimeout, DefaultEnclaveScrapeTimeout))
	}
	return errors.Join(errs...)
}

// Server serves a registry over HTTP.
type Server struct {
	log  *zap.Logger
	srv  *http.Server
	done chan struct{}

	mu   sync.Mutex
	addr net.Addr
}

// Handler serves reg at /metrics and a pointer to it at /.
func Handler(reg *prometheus.Registry) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		// One failing collector (an unreachable enclave is not one: it
		// reports nitrosign_enclave_up 0) must not hide the others.
		ErrorHandling:     promhttp.ContinueOnError,
		Registry:          reg,
		EnableOpenMetrics: true,
	}))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		fmt.Fprintln(w, "nitrosign-proxy metrics: GET /metrics")
	})
	return mux
}

// NewServer makes a server of reg; it does not listen.
func NewServer(reg *prometheus.Registry, log *zap.Logger) *Server {
	if log == nil {
		log = zap.NewNop()
	}
	return &Server{
		log:  log,
		done: make(chan struct{}),
		srv: &http.Server{
			Handler:           Handler(reg),
			ReadHeaderTimeout: 5 * time.Second,
			ReadTimeout:       10 * time.Second,
			// A scrape waits for the enclave stats call (bounded by
			// EnclaveScrapeTimeout) before writing.
			WriteTimeout: 30 * time.Second,
			IdleTimeout:  2 * time.Minute,
			ErrorLog:     zap.NewStdLog(log.WithOptions(zap.IncreaseLevel(zap.WarnLevel))),
		},
	}
}

// Serve serves on l in the background until Shutdown.
func (s *Server) Serve(l net.Listener) {
	s.mu.Lock()
	s.addr = l.Addr()
	s.mu.Unlock()
	if !isLoopback(l.Addr()) {
		s.log.Warn("metrics served beyond loopback: anyone who can reach the port sees call volumes; firewall it or bind 127.0.0.1",
			zap.Stringer("listen", l.Addr()))
	}
	s.log.Info("serving metrics", zap.String("url", "http://"+l.Addr().String()+"/metrics"))
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("metrics server stopped", zap.Error(err))
		}
	}()
}

// Addr is the address served, nil before Serve.
func (s *Server) Addr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addr
}

// Shutdown stops accepting, lets scrapes in progress finish until ctx
// ends, then closes what is left.
func (s *Server) Shutdown(ctx context.Context) error {
	err := s.srv.Shutdown(ctx)
	if err != nil {
		_ = s.srv.Close()
	}
	s.mu.Lock()
	served := s.addr != nil
	s.mu.Unlock()
	if served {
		<-s.done
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return nil // cut, as asked
	}
	return err
}

func isLoopback(a net.Addr) bool {
	ta, ok := a.(*net.TCPAddr)
	return ok && ta.IP.IsLoopback()
}

// Module provides *Metrics (instruments, the pool's and the enclave's
// collectors) and, when Config.Listen is set, serves it with the app.
var Module = fx.Module("metrics", fx.Provide(provide))

// Params are the module's dependencies.
type Params struct {
	fx.In

	Config    Config
	Upstream  Upstream
	Log       *zap.Logger
	Lifecycle fx.Lifecycle
	// Listener, when the graph has one named "metrics", is served instead
	// of listening on Config.Listen (tests inject 127.0.0.1:0 this way).
	Listener net.Listener `name:"metrics" optional:"true"`
}

func provide(p Params) (*Metrics, error) {
	if err := p.Config.Validate(); err != nil {
		return nil, err
	}
	log := p.Log.Named("metrics")
	m := New()
	m.RegisterPool(p.Upstream)
	m.RegisterEnclave(p.Upstream, p.Config.EnclaveScrapeTimeout, log)
	if p.Config.Listen == "" && p.Listener == nil {
		return m, nil
	}
	srv := NewServer(m.Registry(), log)
	p.Lifecycle.Append(fx.Hook{
		OnStart: func(ctx context.Context) error {
			l := p.Listener
			if l == nil {
				var lc net.ListenConfig
				var err error
				if l, err = lc.Listen(ctx, "tcp", p.Config.Listen); err != nil {
					return fmt.Errorf("metrics: listen on %s: %w", p.Config.Listen, err)
				}
			}
			srv.Serve(l)
			return nil
		},
		OnStop: srv.Shutdown,
	})
	return m, nil
}
