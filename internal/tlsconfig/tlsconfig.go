// Package tlsconfig builds the TLS configuration of the host proxy's
// external port (server side, optionally requiring client certificates:
// mutual TLS) and of its clients (the CLI and the benchmark).
//
// The server's certificate, key and client CA bundle are re-read by Reload
// (the proxy calls it on SIGHUP). Connections that are already established
// keep the session they negotiated; only new handshakes see the new files,
// so a reload never drops a connection. A reload that fails (a missing file,
// a key that does not match its certificate) changes nothing: the previous
// certificate stays in use and the error is returned.
package tlsconfig

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"os"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc/credentials"
)

// MinVersion is TLS 1.2, the minimum HTTP/2 allows (RFC 7540 section 9.2);
// Go negotiates TLS 1.3 whenever the peer can.
const MinVersion = tls.VersionTLS12

// CipherSuites are the TLS 1.2 suites offered and accepted: ECDHE with an
// AEAD only (AES-GCM, ChaCha20-Poly1305). Go's defaults also allow CBC
// suites, which HTTP/2 forbids (RFC 9113 appendix A): a client that
// negotiated one would be sent INADEQUATE_SECURITY or fail obscurely. TLS
// 1.3 suites are all AEAD and not configurable.
var CipherSuites = []uint16{
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
	tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
}

// ServerConfig names the PEM files of a TLS server. The zero value means no
// TLS.
type ServerConfig struct {
	// CertFile is the server's certificate chain (leaf first), PEM. Empty
	// means plaintext. Default empty.
	CertFile string
	// KeyFile is the private key of CertFile's leaf, PEM (PKCS#1, PKCS#8 or
	// SEC 1). Required with CertFile. Default empty.
	KeyFile string
	// ClientCAFile is a PEM bundle of the CAs that sign client
	// certificates. When set, every client must present a certificate
	// that chains to one of them (mutual TLS). Requires CertFile. Default
	// empty (no client certificate asked for).
	ClientCAFile string
	// OnLoad, when set, is called with the leaf certificate after every
	// successful load (NewServer, Reload): the proxy's binary exports its
	// expiry as a metric this way. Not a flag. Default nil.
	OnLoad func(leaf *x509.Certificate)
}

// ExpiryWarning is how long before its NotAfter a certificate being loaded
// is logged at WARN level, not INFO.
const ExpiryWarning = 14 * 24 * time.Hour

// Enabled reports whether TLS is configured.
func (c ServerConfig) Enabled() bool { return c.CertFile != "" || c.KeyFile != "" }

// MutualTLS reports whether client certificates are required.
func (c ServerConfig) MutualTLS() bool { return c.ClientCAFile != "" }

// Validate reports every missing half of a pair. It does not read files:
// NewServer does, with precise errors.
func (c ServerConfig) Validate() error {
	var errs []error
	if c.CertFile != "" && c.KeyFile == "" {
		errs = append(errs, errors.New("TLS certificate given without its key: add --tls-key"))
	}
	if c.KeyFile != "" && c.CertFile == "" {
		errs = append(errs, errors.New("TLS key given without its certificate: add --tls-cert"))
	}
	if c.ClientCAFile != "" && c.CertFile == "" {
		errs = append(errs, errors.New("client CA (mutual TLS) needs a server certificate: add --tls-cert and --tls-key"))
	}
	return errors.Join(errs...)
}

// serverState is one loaded set of files.
type serverState struct {
	cert      *tls.Certificate
	clientCAs *x509.CertPool // nil: no client certificates
}

// Server is a reloadable TLS server configuration. It is safe for
// concurrent use: handshakes read the current state atomically.
type Server struct {
	cfg   ServerConfig
	log   *zap.Logger
	state atomic.Pointer[serverState]
}

// NewServer loads cfg's files. cfg must be Enabled.
func NewServer(cfg ServerConfig, log *zap.Logger) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if !cfg.Enabled() {
		return nil, errors.New("tlsconfig: no certificate configured")
	}
	if log == nil {
		log = zap.NewNop()
	}
	s := &Server{cfg: cfg, log: log.Named("tls")}
	st, err := loadServer(cfg)
	if err != nil {
		return nil, err
	}
	s.state.Store(st)
	s.loaded("loaded", st)
	return s, nil
}

// Reload re-reads the certificate, key and client CA bundle. On error the
// previous state stays in use.
func (s *Server) Reload() error {
	st, err := loadServer(s.cfg)
	if err != nil {
		return fmt.Errorf("TLS reload (previous certificate kept): %w", err)
	}
	s.state.Store(st)
	s.loaded("reloaded", st)
	return nil
}

// Leaf returns the certificate now served.
func (s *Server) Leaf() *x509.Certificate { return s.state.Load().cert.Leaf }

// TLSConfig returns a configuration whose every handshake uses the state
// current at that moment.
func (s *Server) TLSConfig() *tls.Config {
	return &tls.Config{
		MinVersion:   MinVersion,
		CipherSuites: CipherSuites,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			st := s.state.Load()
			c := &tls.Config{
				MinVersion:   MinVersion,
				CipherSuites: CipherSuites,
				Certificates: []tls.Certificate{*st.cert},
			}
			if st.clientCAs != nil {
				c.ClientAuth = tls.RequireAndVerifyClientCert
				c.ClientCAs = st.clientCAs
			}
			return c, nil
		},
	}
}

// Credentials are TLSConfig as gRPC transport credentials (grpc adds the
// h2 ALPN protocol to every per-handshake configuration).
func (s *Server) Credentials() credentials.TransportCredentials {
	return credentials.NewTLS(s.TLSConfig())
}

func loadServer(cfg ServerConfig) (*serverState, error) {
	cert, err := tls.LoadX509KeyPair(cfg.CertFile, cfg.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("load TLS certificate %s and key %s: %w", cfg.CertFile, cfg.KeyFile, err)
	}
	if cert.Leaf == nil { // Go >= 1.23 fills Leaf; parse it otherwise
		if cert.Leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil, fmt.Errorf("parse TLS certificate %s: %w", cfg.CertFile, err)
		}
	}
	st := &serverState{cert: &cert}
	if cfg.ClientCAFile != "" {
		if st.clientCAs, err = loadPool(cfg.ClientCAFile); err != nil {
			return nil, fmt.Errorf("client CA: %w", err)
		}
	}
	return st, nil
}

// loaded logs the certificate just loaded (verb: loaded, reloaded): at
// ERROR level when it has expired (it is served anyway: refusing to start
// would not help clients, which refuse it either way), at WARN level when it
// expires within ExpiryWarning, else at INFO level. Then it calls OnLoad.
func (s *Server) loaded(verb string, st *serverState) {
	leaf := st.cert.Leaf
	fields := certFields(st, s.cfg)
	left := time.Until(leaf.NotAfter)
	const todo = "renew it, then reload: systemctl reload nitrosign-proxy (SIGHUP); the proxy keeps serving the new files without dropping connections"
	switch {
	case left <= 0:
		s.log.Error("TLS certificate "+verb+" HAS EXPIRED: clients will refuse it; still serving it, "+todo,
			append(fields, zap.Duration("expired_for", -left.Round(time.Second)))...)
	case left < ExpiryWarning:
		s.log.Warn("TLS certificate "+verb+" expires soon: "+todo,
			append(fields, zap.Duration("expires_in", left.Round(time.Second)))...)
	default:
		s.log.Info("TLS certificate "+verb, fields...)
	}
	if s.cfg.OnLoad != nil {
		s.cfg.OnLoad(leaf)
	}
}

func certFields(st *serverState, cfg ServerConfig) []zap.Field {
	leaf := st.cert.Leaf
	sum := sha256.Sum256(leaf.Raw)
	return []zap.Field{
		zap.String("cert_file", cfg.CertFile),
		zap.String("subject", leaf.Subject.String()),
		zap.Strings("dns_names", leaf.DNSNames),
		zap.Time("not_after", leaf.NotAfter),
		zap.String("sha256", hex.EncodeToString(sum[:])),
		zap.Bool("mutual_tls", st.clientCAs != nil),
	}
}

// loadPool reads a PEM bundle that must hold at least one certificate.
func loadPool(path string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("%s: no PEM certificate found", path)
	}
	return p, nil
}

// ClientConfig is the client side: the flags the CLI and the benchmark
// share (RegisterFlags). The zero value is plaintext.
type ClientConfig struct {
	// Enabled turns TLS on with the system's root CAs, even without any
	// file. Any file below turns it on too. Default false.
	Enabled bool
	// CAFile is a PEM bundle of the CAs that may sign the proxy's
	// certificate, instead of the system roots. Default empty.
	CAFile string
	// CertFile and KeyFile are the client certificate and key presented
	// to a proxy that requires mutual TLS. Both or neither. Default empty.
	CertFile string
	KeyFile  string
	// ServerName overrides the name checked in the proxy's certificate
	// (default: the host of the target address).
	ServerName string
}

// RegisterFlags adds --tls, --tls-ca, --tls-cert, --tls-key and
// --tls-server-name to fs.
func (c *ClientConfig) RegisterFlags(fs *flag.FlagSet) {
	fs.BoolVar(&c.Enabled, "tls", c.Enabled, "use TLS to the proxy (tcp:// targets), verified against the system roots unless --tls-ca is given")
	fs.StringVar(&c.CAFile, "tls-ca", c.CAFile, "PEM `file` of the CA(s) that sign the proxy's certificate (implies --tls)")
	fs.StringVar(&c.CertFile, "tls-cert", c.CertFile, "client certificate PEM `file` for a proxy that requires mutual TLS (implies --tls; needs --tls-key)")
	fs.StringVar(&c.KeyFile, "tls-key", c.KeyFile, "client private key PEM `file` (with --tls-cert)")
	fs.StringVar(&c.ServerName, "tls-server-name", c.ServerName, "`name` to verify in the proxy's certificate, when it differs from the target host")
}

// On reports whether TLS is to be used.
func (c ClientConfig) On() bool {
	return c.Enabled || c.CAFile != "" || c.CertFile != "" || c.KeyFile != "" || c.ServerName != ""
}

// Validate reports a half-given client certificate pair.
func (c ClientConfig) Validate() error {
	if (c.CertFile == "") != (c.KeyFile == "") {
		return errors.New("--tls-cert and --tls-key go together: give both or neither")
	}
	return nil
}

// TLSConfig loads the files and returns the client configuration, nil when
// TLS is off.
func (c ClientConfig) TLSConfig() (*tls.Config, error) {
	if !c.On() {
		return nil, nil
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	tc := &tls.Config{MinVersion: MinVersion, CipherSuites: CipherSuites, ServerName: c.ServerName}
	if c.CAFile != "" {
		p, err := loadPool(c.CAFile)
		if err != nil {
			return nil, fmt.Errorf("TLS CA: %w", err)
		}
		tc.RootCAs = p
	}
	if c.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("load client certificate %s and key %s: %w", c.CertFile, c.KeyFile, err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	return tc, nil
}
