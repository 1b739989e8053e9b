package proxy

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"regexp"
	"strconv"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"

	"github.com/nitrosign/nitrosign/host/auditlog"
	"github.com/nitrosign/nitrosign/host/keystore"
	"github.com/nitrosign/nitrosign/host/kmsforward"
	"github.com/nitrosign/nitrosign/host/metrics"
	"github.com/nitrosign/nitrosign/host/pool"
	"github.com/nitrosign/nitrosign/internal/limits"
	"github.com/nitrosign/nitrosign/internal/logging"
	"github.com/nitrosign/nitrosign/internal/pprofserver"
	"github.com/nitrosign/nitrosign/internal/target"
	"github.com/nitrosign/nitrosign/internal/tlsconfig"
)

// Defaults. The enclave's CID is chosen by `nitro-cli run-enclave
// --enclave-cid`; it is always >= 4 (0-3 are reserved: hypervisor, local
// loopback, host, parent). 16 is the CID deploy/enclave.env and
// scripts/run-enclave.sh give the enclave; pass another if you chose one.
// 5005 is the enclave signer's default vsock port.
const (
	DefaultListen   = "127.0.0.1:8443"
	DefaultUpstream = "vsock://16:5005"
)

// Config configures the proxy. Start from DefaultConfig; Validate is strict.
type Config struct {
	// Listen is the TCP address (HOST:PORT) the proxy serves gRPC on.
	// Default 127.0.0.1:8443. A non-loopback address needs TLS (see TLS)
	// or, explicitly, Insecure.
	Listen string
	// TLS is the external port's certificate, key and, for mutual TLS,
	// the client CA bundle; re-read on SIGHUP (Proxy.ReloadTLS). Default
	// none: plaintext, allowed on loopback only unless Insecure.
	TLS tlsconfig.ServerConfig
	// Insecure allows plaintext on a non-loopback Listen address: anyone
	// who reaches the port can then use the enclave's keys. Default false.
	Insecure bool
	// Metrics configures the Prometheus endpoint; see metrics.Config.
	// Default off.
	Metrics metrics.Config
	// PprofListen serves Go's runtime profiles (/debug/pprof/) on this
	// loopback HOST:PORT, for profiling under load (docs/PERFORMANCE.md).
	// Only loopback addresses are accepted. Default empty: off.
	PprofListen string
	// Upstreams are the enclave signers the proxy forwards to, each
	// vsock://CID:PORT (an enclave CID is >= 4; 1 is local loopback, for
	// tests) or tcp://HOST:PORT for development: --upstream, repeated for
	// several enclaves on one parent (CIDs 16, 17, ...). Calls are
	// balanced across those that serve; all must serve the same keyset
	// (see Upstreams). Default [vsock://16:5005].
	Upstreams []string
	// Pool configures the connections to each upstream (Size slots each);
	// see pool.Config. Default pool.DefaultConfig() (4 connections, health
	// checked over the connection itself).
	Pool pool.Config
	// GracefulStopTimeout bounds how long a stop waits for calls in flight
	// before cutting them. Default 10s.
	GracefulStopTimeout time.Duration
	// MaxSendMsgSize is the largest response message, in bytes, accepted
	// from the enclave and sent on to a client. Default 4 MiB.
	MaxSendMsgSize int
	// Log selects log level and format. Default info, json.
	Log logging.Config
	// EnclaveLogPort is the vsock port (any CID) on which the proxy
	// receives the log lines enclaves ship (nitrosign-enclave --log-ship,
	// vsock://3:5050 by default) and writes them to its own log, with the
	// enclave's fields (package enclavelog). 0: off. Default 0; the
	// systemd unit sets 5050.
	EnclaveLogPort uint32
	// EnclaveHostPort is the vsock port (any CID) on which the proxy
	// serves its enclaves the HostService (package keystore): the sealed
	// keyset kept in KeysetFile, and the AWS credentials of the instance
	// role, for nitrosign-enclave --key-mode sealed (its --keyset-host,
	// vsock://3:5051 by default). 0: off, and no credentials are loaded.
	// Default 0; the systemd unit sets 5051.
	EnclaveHostPort uint32
	// KeysetFile is the sealed keyset the host service keeps, an absolute
	// path; PATH.prev (the keyset it replaced) and PATH.init (nitrosign
	// keyset init) go beside it. Default /var/lib/nitrosign/keyset.sealed
	// (the unit's StateDirectory).
	KeysetFile string
	// KMSForwardPort is the vsock port (any CID) on which the proxy
	// relays its enclaves' connections to AWS KMS (package kmsforward),
	// to KMSDestination and nowhere else; TLS runs end to end between the
	// enclave and KMS (the enclave's --kms-proxy, vsock://3:8000 by
	// default). 0: off. Default 0; the systemd unit sets 8000.
	KMSForwardPort uint32
	// KMSRegion is the AWS region whose KMS endpoint the forwarder relays
	// to, e.g. eu-west-1: kms.eu-west-1.amazonaws.com:443 (the partition's
	// domain elsewhere: kms.cn-north-1.amazonaws.com.cn:443). It must be
	// the region of the enclave's KMS key. Default empty; KMSRegion or
	// KMSEndpoint is required when KMSForwardPort is set.
	KMSRegion string
	// KMSEndpoint is the HOST:PORT the forwarder relays to instead of
	// KMSRegion's endpoint: a FIPS endpoint (kms-fips.REGION.amazonaws.com
	// :443), a VPC endpoint, or a test KMS. Default empty.
	KMSEndpoint string
	// EnclaveAuditPort is the vsock port (any CID) on which the proxy
	// receives the audit trail of signing decisions enclaves ship
	// (package auditlog; the enclave's side is enclave/audit, dialling
	// vsock://3:5052) and appends it to AuditFile. 0: off. Default 0; the
	// systemd unit sets 5052.
	EnclaveAuditPort uint32
	// AuditFile is the audit file, an absolute path whose directory must
	// exist; it is only ever appended to (O_APPEND, 0600, fsync before each
	// acknowledgement). `nitrosign audit verify --file PATH` checks it.
	// Default /var/lib/nitrosign/audit.jsonl (the unit's StateDirectory).
	AuditFile string
	// AuditLogDecisions also logs every stored decision, and each signed
	// head, at info in the proxy's log (journald): fields only (the
	// message's SHA-256, never the message). Default false.
	AuditLogDecisions bool

	// Limits protect the proxy, and the enclave behind it, from load and
	// from hostile or broken clients (internal/limits; docs/RELIABILITY.md
	// lists what each one answers). Defaults (DefaultConfig):
	//   - MaxConnections 1024, counted in
	//     nitrosign_proxy_shed_total{reason="max_connections"} when full.
	//   - MaxInFlight 4096 (the enclave's own bound, 1024 by default,
	//     sheds first when the enclave is the bottleneck).
	//   - DefaultCallTimeout 30s, given to a unary call of a known method
	//     (nitrosign, health, reflection, stats) and sent upstream with it;
	//     streams and unknown methods get DefaultStreamTimeout.
	//   - MaxConcurrentStreams 1024 per client connection.
	//   - MaxHeaderListSize 32 KiB, MaxMetadataSize 16 KiB: below the
	//     enclave's own (64 and 32 KiB), so whatever the proxy forwards is
	//     accepted.
	//   - MaxRecvMsgSize 4 MiB (grpc-go's default).
	//   - HandshakeTimeout 10s (TLS and the HTTP/2 preface).
	//   - KeepaliveMinTime 10s (the shortest interval a grpc-go client can
	//     ping at), KeepaliveTime 2m, KeepaliveTimeout 20s.
	//   - MaxConnectionIdle 15m; MaxConnectionAge 1h, so clients rebalance
	//     and re-handshake (a client certificate revoked by a --client-ca
	//     reload stops working within the age), with MaxConnectionAgeGrace
	//     30s (the default call timeout: unary calls finish).
	Limits limits.Config
	// The limits below are the proxy's own: what a relay that multiplexes
	// many clients onto a few upstream connections must bound per client.

	// AllowKeyAdmin forwards nitrosign.v1.KeyAdminService (key rotation)
	// from the proxy's clients. Default false: they are answered
	// PermissionDenied, and the operator rotates from the parent, over
	// vsock to the enclave directly (nitrosign keys create --target
	// vsock://CID:5005). The enclave does not authorise callers itself
	// yet: this keeps whoever may sign through the proxy from also
	// replacing or disabling keys.
	AllowKeyAdmin bool
	// DefaultStreamTimeout is the deadline given to a streaming call, or a
	// call of a method the proxy does not know, that arrived without one,
	// so that no stream holds its share of the enclave for ever by
	// default; 0 gives none. Default 1h.
	DefaultStreamTimeout time.Duration
	// MaxConnectionCalls bounds the calls one client connection may have
	// open at the enclave at once: its share of the enclave's in-flight
	// slots (1024 by default), so one connection cannot take them all.
	// A call beyond it gets ResourceExhausted. Default 256 (a quarter).
	MaxConnectionCalls int
	// MaxClientResets is the number of streams a client connection may
	// reset at once while the proxy still relays them; it earns a tenth
	// of it back each second. Beyond it the connection is sent GOAWAY
	// ENHANCE_YOUR_CALM (rapid reset, CVE-2023-44487). Default 1000.
	MaxClientResets int
	// MaxConnectionBuffer bounds, in bytes, what one client connection can
	// make the proxy queue that drains without the proxy reading more from
	// it (frames for a client that does not read them, request bytes the
	// enclave cannot take yet): above it the proxy stops reading from that
	// client until it drains. Default 1 MiB.
	MaxConnectionBuffer int
	// MemoryBudget bounds, in bytes, what the relay buffers across all
	// connections (frames queued both ways, requests waiting to be
	// complete, responses waiting for a client's window). Over it, new
	// calls get ResourceExhausted and every connection holding more than
	// an eighth of MaxConnectionBuffer stops being read until it drains.
	// Default 128 MiB: the proxy's RSS under the attacks in
	// docs/RELIABILITY.md stays under twice this.
	MemoryBudget int64
}

// DefaultConfig returns the documented defaults.
func DefaultConfig() Config {
	return Config{
		Listen:              DefaultListen,
		Upstreams:           []string{DefaultUpstream},
		Pool:                pool.DefaultConfig(),
		GracefulStopTimeout: 10 * time.Second,
		MaxSendMsgSize:      4 << 20,
		Log:                 logging.Config{Level: "info", Format: "json"},

		Limits: limits.Config{
			MaxConnections:        1024,
			MaxInFlight:           4096,
			DefaultCallTimeout:    30 * time.Second,
			MaxConcurrentStreams:  1024,
			MaxHeaderListSize:     32 << 10,
			MaxMetadataSize:       16 << 10,
			MaxRecvMsgSize:        4 << 20,
			HandshakeTimeout:      10 * time.Second,
			KeepaliveMinTime:      10 * time.Second,
			KeepaliveTime:         2 * time.Minute,
			KeepaliveTimeout:      20 * time.Second,
			MaxConnectionIdle:     15 * time.Minute,
			MaxConnectionAge:      time.Hour,
			MaxConnectionAgeGrace: 30 * time.Second,
		},
		DefaultStreamTimeout: time.Hour,
		MaxConnectionCalls:   256,
		MaxClientResets:      1000,
		MaxConnectionBuffer:  1 << 20,
		MemoryBudget:         128 << 20,
		KeysetFile:           keystore.DefaultPath,
		AuditFile:            auditlog.DefaultPath,
	}
}

// vsockCIDAny is VMADDR_CID_ANY: a wildcard for listening, never a peer.
const vsockCIDAny = math.MaxUint32

// Validate reports every invalid field, each with a precise message.
func (c Config) Validate() error {
	var errs []error
	if err := validateListen(c.Listen); err != nil {
		errs = append(errs, err)
	} else if !c.TLS.Enabled() && !c.Insecure && !isLoopback(c.Listen) {
		errs = append(errs, fmt.Errorf("listen address %q is not loopback and the port has no TLS: "+
			"give --tls-cert and --tls-key (and --client-ca for mutual TLS), or --insecure to serve plaintext anyway", c.Listen))
	}
	if err := c.TLS.Validate(); err != nil {
		errs = append(errs, err)
	}
	if c.Insecure && c.TLS.Enabled() {
		errs = append(errs, errors.New("--insecure (plaintext) contradicts --tls-cert: give one or the other"))
	}
	if err := c.Metrics.Validate(); err != nil {
		errs = append(errs, err)
	}
	if err := (pprofserver.Config{Listen: c.PprofListen}).Validate(); err != nil {
		errs = append(errs, err)
	}
	if _, err := c.upstreams(); err != nil {
		errs = append(errs, err)
	}
	if err := c.Pool.Validate(); err != nil {
		errs = append(errs, err)
	}
	if c.GracefulStopTimeout <= 0 {
		errs = append(errs, fmt.Errorf("graceful stop timeout %v: must be > 0", c.GracefulStopTimeout))
	}
	if c.MaxSendMsgSize < 1 {
		errs = append(errs, fmt.Errorf("max send message size %d: must be >= 1 byte", c.MaxSendMsgSize))
	}
	if err := c.Log.Validate(); err != nil {
		errs = append(errs, err)
	}
	if c.EnclaveLogPort == target.ReservedVsockPort {
		errs = append(errs, fmt.Errorf("enclave log port %d is nitro-cli's boot heartbeat", c.EnclaveLogPort))
	}
	errs = append(errs, c.validateEnclaveServices()...)
	errs = append(errs, c.validateLimits()...)
	return errors.Join(errs...)
}

// validateEnclaveServices checks the vsock services the proxy offers its
// enclaves: the log receiver, the host service, the KMS forwarder and the
// audit receiver.
func (c Config) validateEnclaveServices() []error {
	var errs []error
	if c.EnclaveHostPort == target.ReservedVsockPort {
		errs = append(errs, fmt.Errorf("enclave host port %d is nitro-cli's boot heartbeat: choose another --enclave-host-port (the enclave's default is 5051)", c.EnclaveHostPort))
	}
	if c.KMSForwardPort == target.ReservedVsockPort {
		errs = append(errs, fmt.Errorf("KMS forward port %d is nitro-cli's boot heartbeat: choose another --kms-forward-port (the enclave's default is 8000)", c.KMSForwardPort))
	}
	if c.EnclaveAuditPort == target.ReservedVsockPort {
		errs = append(errs, fmt.Errorf("enclave audit port %d is nitro-cli's boot heartbeat: choose another --enclave-audit-port (the enclave's default is %d)", c.EnclaveAuditPort, auditlog.DefaultPort))
	}
	ports := []struct {
		flag string
		port uint32
	}{{"--enclave-log-port", c.EnclaveLogPort}, {"--enclave-host-port", c.EnclaveHostPort}, {"--kms-forward-port", c.KMSForwardPort},
		{"--enclave-audit-port", c.EnclaveAuditPort}}
	for i, a := range ports {
		for _, b := range ports[i+1:] {
			if a.port != 0 && a.port == b.port {
				errs = append(errs, fmt.Errorf("%s and %s are both vsock port %d: each service needs its own port", a.flag, b.flag, a.port))
			}
		}
	}
	if c.EnclaveHostPort != 0 {
		if err := keystore.ValidatePath(c.KeysetFile); err != nil {
			errs = append(errs, fmt.Errorf("--keyset-file: %w", err))
		}
	}
	if c.EnclaveAuditPort != 0 {
		if err := auditlog.ValidatePath(c.AuditFile); err != nil {
			errs = append(errs, fmt.Errorf("--audit-file: %w", err))
		} else if c.EnclaveHostPort != 0 && c.AuditFile == c.KeysetFile {
			errs = append(errs, fmt.Errorf("--audit-file and --keyset-file are both %s: each needs its own file", c.AuditFile))
		}
	}
	if c.KMSRegion != "" && !kmsRegion.MatchString(c.KMSRegion) {
		errs = append(errs, fmt.Errorf("KMS region %q: want an AWS region name such as eu-west-1 (the region of the enclave's KMS key)", c.KMSRegion))
	} else if c.KMSRegion != "" && c.KMSEndpoint == "" {
		if _, err := c.KMSDestination(); err != nil {
			errs = append(errs, err)
		}
	}
	if c.KMSEndpoint != "" {
		if err := (kmsforward.Config{Destination: c.KMSEndpoint}).Validate(); err != nil {
			errs = append(errs, fmt.Errorf("--kms-endpoint: %w", err))
		}
	}
	switch {
	case c.KMSForwardPort != 0 && c.KMSRegion == "" && c.KMSEndpoint == "":
		errs = append(errs, fmt.Errorf("KMS forward port %d has no destination: give --kms-region (the region of the enclave's KMS key, e.g. eu-west-1) or --kms-endpoint HOST:PORT", c.KMSForwardPort))
	case c.KMSForwardPort == 0 && (c.KMSRegion != "" || c.KMSEndpoint != ""):
		errs = append(errs, errors.New("--kms-region and --kms-endpoint set where the KMS forwarder relays to, and it is off: give --kms-forward-port too (the enclave's default is 8000)"))
	}
	return errs
}

// kmsRegion is the shape of an AWS region name: eu-west-1, us-gov-west-1,
// cn-north-1, eusc-de-east-1.
var kmsRegion = regexp.MustCompile(`^[a-z]{2,}(-[a-z]+)+-[0-9]+$`)

// KMSDestination is where the KMS forwarder relays to: KMSEndpoint, or
// KMSRegion's KMS endpoint as the official SDK resolves it, on port 443.
func (c Config) KMSDestination() (string, error) {
	if c.KMSEndpoint != "" {
		return c.KMSEndpoint, nil
	}
	if !kmsRegion.MatchString(c.KMSRegion) {
		return "", fmt.Errorf("KMS region %q: want an AWS region name such as eu-west-1", c.KMSRegion)
	}
	ep, err := kms.NewDefaultEndpointResolverV2().ResolveEndpoint(context.Background(), kms.EndpointParameters{
		Region: aws.String(c.KMSRegion), UseFIPS: aws.Bool(false), UseDualStack: aws.Bool(false),
	})
	if err != nil {
		return "", fmt.Errorf("KMS region %q: no KMS endpoint: %w", c.KMSRegion, err)
	}
	if ep.URI.Scheme != "https" || ep.URI.Hostname() == "" {
		return "", fmt.Errorf("KMS region %q: unexpected KMS endpoint %q", c.KMSRegion, ep.URI.String())
	}
	port := ep.URI.Port()
	if port == "" {
		port = "443"
	}
	return net.JoinHostPort(ep.URI.Hostname(), port), nil
}

func validateListen(s string) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return fmt.Errorf("listen address %q: want HOST:PORT, e.g. %s", s, DefaultListen)
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || (p == 0 && port != "0") {
		return fmt.Errorf("listen address %q: port must be a number 0-65535", s)
	}
	_ = host // empty host means every interface: valid, warned about in New
	return nil
}

// maxUpstreams bounds --upstream (enclaves on one parent instance).
const maxUpstreams = 64

// upstreams parses and checks Upstreams.
func (c Config) upstreams() ([]target.Target, error) {
	if len(c.Upstreams) == 0 {
		return nil, errors.New("upstream: none given; want --upstream vsock://CID:PORT (repeat it for several enclaves)")
	}
	if len(c.Upstreams) > maxUpstreams {
		return nil, fmt.Errorf("upstream: %d given, at most %d", len(c.Upstreams), maxUpstreams)
	}
	var out []target.Target
	seen := map[string]bool{}
	for _, s := range c.Upstreams {
		t, err := parseUpstream(s)
		if err != nil {
			return nil, err
		}
		if seen[t.String()] {
			return nil, fmt.Errorf("upstream %q given twice", s)
		}
		seen[t.String()] = true
		out = append(out, t)
	}
	return out, nil
}

// parseUpstream parses and checks one upstream address.
func parseUpstream(s string) (target.Target, error) {
	t, err := target.Parse(s)
	if err != nil {
		return target.Target{}, fmt.Errorf("upstream: %w", err)
	}
	if t.Scheme == target.VSOCK {
		switch {
		case t.CID == 0:
			return target.Target{}, fmt.Errorf("upstream %q: CID 0 is the hypervisor; an enclave CID is >= 4", s)
		case t.CID == vsockCIDAny:
			return target.Target{}, fmt.Errorf("upstream %q: CID %d is VMADDR_CID_ANY, not a peer; an enclave CID is >= 4", s, t.CID)
		case t.Port == target.ReservedVsockPort:
			return target.Target{}, fmt.Errorf("upstream %q: port %d is reserved for the nitro-cli boot heartbeat", s, t.Port)
		}
	}
	return t, nil
}

// isLoopback reports whether a listen address only accepts local peers.
func isLoopback(listen string) bool {
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
