/*
 * Web shells: server-side scripts that run whatever a request sends. Part of elkscan's default rules.
 */

rule Php_Webshell_EvalRequest
{
    meta:
        description = "PHP that evaluates or executes request input directly"
        author = "elkscan"
    strings:
        $open = "<?" ascii
        $exec = /\b(eval|assert|system|passthru|shell_exec|exec|popen|proc_open|create_function)\s*\(\s*(base64_decode\s*\(\s*|str_rot13\s*\(\s*|gzinflate\s*\(\s*)*(@\s*)?\$_(GET|POST|REQUEST|COOKIE|SERVER)\s*\[/ nocase
    condition:
        filesize < 2MB and $open and $exec
}

rule Jsp_Webshell_RuntimeExec
{
    meta:
        description = "JSP that runs a request parameter as an operating-system command"
        author = "elkscan"
    strings:
        $exec = /Runtime\.getRuntime\(\)\.exec\s*\(\s*request\.getParameter\s*\(/
        $pb = /new\s+ProcessBuilder\s*\(\s*request\.getParameter\s*\(/
    condition:
        filesize < 2MB and any of them
}

rule Asp_Webshell_EvalRequest
{
    meta:
        description = "ASP/ASPX that evaluates request input (the China Chopper one-liner and kin)"
        author = "elkscan"
    strings:
        $eval = /<%@?[^%]{0,64}\b(eval|execute)\s*\(?\s*request(\.form|\.querystring|\.item)?\s*[\(\[]/ nocase
    condition:
        filesize < 2MB and $eval
}
