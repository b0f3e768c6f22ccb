/*
 * Reverse shells: a shell wired to a network connection. Part of elkscan's default rules.
 */

rule Linux_ReverseShell_DevTcp
{
    meta:
        description = "Interactive shell redirected to bash's /dev/tcp or /dev/udp pseudo-device"
        author = "elkscan"
    strings:
        $redirect = /\b(ba|z|k)?sh\s+-i\s*(>&|&>|>)\s*\/dev\/(tcp|udp)\/[a-zA-Z0-9.\-]{1,253}\/[0-9]{1,5}/
    condition:
        $redirect
}

rule Linux_ReverseShell_NetcatExec
{
    meta:
        description = "netcat told to execute a shell for its peer (-e /bin/sh)"
        author = "elkscan"
    strings:
        $nc_e = /\b(nc|ncat|netcat)(\.traditional|\.openbsd)? [^\n;|&]{0,80}-e ?\/bin\/(ba|z|k|da)?sh\b/
        $nc_c = /\b(nc|ncat|netcat)(\.traditional|\.openbsd)? [^\n;|&]{0,80}-c ?["']?(ba|z|k|da)?sh\b/
    condition:
        any of them
}
