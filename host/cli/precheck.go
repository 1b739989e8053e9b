package cli

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/nitrosign/nitrosign/internal/target"
)

// precheckWait bounds how long the pre-check waits for the server's first
// HTTP/2 frame; past it the check passes and the RPC path decides.
const precheckWait = 3 * time.Second

// h2Preface is the HTTP/2 client connection preface followed by an empty
// SETTINGS frame: a gRPC server answers with its own SETTINGS frame.
var h2Preface = []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")

// precheckTLS dials a tcp:// target once, before gRPC does, to report at
// once a mismatch gRPC would only show as "cannot reach" after the whole
// --timeout: a TLS proxy dialed without --tls, a plaintext server dialed
// with it, a certificate not signed by --tls-ca or not for the name dialed,
// a client certificate the proxy refuses. It returns nil when the server
// cannot be reached at all or answers as expected (the normal path reports
// those), and an error naming the cause and what to do otherwise.
func precheckTLS(ctx context.Context, t target.Target, tc *tls.Config) error {
	if t.Scheme != target.TCP {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, precheckWait)
	defer cancel()
	raw, err := t.Dial(ctx)
	if err != nil {
		return nil // not listening: gRPC retries until --timeout and says so
	}
	defer raw.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = raw.SetDeadline(dl)
	}
	if tc == nil {
		if answersH2(raw) || !speaksTLS(ctx, t) {
			return nil
		}
		return fmt.Errorf("%s speaks TLS but the command dialed plaintext: add --tls (with --tls-ca FILE when the proxy's certificate is from a private CA, and --tls-cert/--tls-key when it requires client certificates)", t)
	}
	c := tc.Clone()
	c.NextProtos = []string{"h2"}
	if c.ServerName == "" {
		c.ServerName, _, _ = net.SplitHostPort(t.HostPort)
	}
	conn := tls.Client(raw, c)
	if err := conn.HandshakeContext(ctx); err != nil {
		return handshakeError(t, err)
	}
	// With TLS 1.3 the server checks the client certificate after the
	// client's handshake is done: its refusal arrives on the first read.
	if _, err := conn.Write(h2Preface); err != nil {
		return handshakeError(t, err)
	}
	if _, err := io.ReadFull(conn, make([]byte, 9)); err != nil {
		var alert tls.AlertError
		if errors.As(err, &alert) || strings.Contains(err.Error(), "remote error: tls:") {
			return handshakeError(t, err)
		}
	}
	return nil
}

// answersH2 reports whether the server answers the HTTP/2 preface with an
// HTTP/2 frame (a plaintext gRPC server does).
func answersH2(conn net.Conn) bool {
	if _, err := conn.Write(h2Preface); err != nil {
		return false
	}
	hdr := make([]byte, 9)
	if _, err := io.ReadFull(conn, hdr); err != nil {
		var ne net.Error
		return errors.As(err, &ne) && ne.Timeout() // silent: not ours to judge
	}
	return hdr[3] == 0x4 // a SETTINGS frame
}

// speaksTLS reports whether the server completes (or answers with an alert)
// a TLS handshake; no certificate is checked.
func speaksTLS(ctx context.Context, t target.Target) bool {
	raw, err := t.Dial(ctx)
	if err != nil {
		return false
	}
	defer raw.Close()
	conn := tls.Client(raw, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}}) //nolint:gosec // a probe, nothing is sent
	err = conn.HandshakeContext(ctx)
	var alert tls.AlertError
	return err == nil || errors.As(err, &alert) || strings.Contains(err.Error(), "remote error: tls:")
}

// handshakeError explains a failed TLS handshake with t.
func handshakeError(t target.Target, err error) error {
	var (
		unknownCA x509.UnknownAuthorityError
		hostname  x509.HostnameError
		invalid   x509.CertificateInvalidError
		record    tls.RecordHeaderError
	)
	hint := "check --tls-ca, --tls-cert, --tls-key and --tls-server-name against the proxy's --tls-cert and --client-ca"
	msg := err.Error()
	switch {
	case errors.As(err, &unknownCA):
		hint = "the proxy's certificate is not signed by a CA trusted here: give its CA with --tls-ca FILE"
	case errors.As(err, &hostname):
		hint = "the proxy's certificate is not for the name dialed: dial a name it holds, or give one with --tls-server-name NAME"
	case errors.As(err, &invalid) && invalid.Reason == x509.Expired:
		hint = "the proxy's certificate has expired (or is not yet valid): renew it on the proxy, then systemctl reload nitrosign-proxy"
	case errors.As(err, &record) || errors.Is(err, io.EOF) && !strings.Contains(msg, "remote error"):
		hint = "the server does not speak TLS: drop --tls and the --tls-* flags (or point at the proxy's TLS port)"
	case strings.Contains(msg, "certificate required"):
		hint = "the proxy requires a client certificate (mutual TLS) issued by its --client-ca: give --tls-cert FILE --tls-key FILE of one (a certificate from another CA is not even sent)"
	case strings.Contains(msg, "bad certificate") || strings.Contains(msg, "unknown certificate authority") || strings.Contains(msg, "certificate expired"):
		hint = "the proxy refused the client certificate: give one (--tls-cert, --tls-key) issued by the proxy's --client-ca and still valid"
	}
	return fmt.Errorf("TLS handshake with %s failed: %v: %s", t, err, hint)
}
